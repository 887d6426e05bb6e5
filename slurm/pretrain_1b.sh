#!/bin/bash
# Train the 1b GPT on 2 nodes x 8 GPUs, with preemption handling and automatic requeue.
#
#   sbatch slurm/pretrain_1b.sh
#   CONFIG=configs/smoke.yaml RUN_DIR=runs/smoke sbatch --nodes=1 --ntasks-per-node=2 \
#       --gpus-per-node=0 slurm/pretrain_1b.sh            # the same script, CPU smoke run
#
# Layout: TP2 x PP2 x DP4 with ZeRO-1 (configs/pretrain_1b.yaml). TP2 stays inside a node's
# NVLink domain (TP all-reduces every layer); PP2 splits the 24 layers over 2 stages, whose
# point-to-point traffic crosses nodes cheaply; DP4 spreads ZeRO-1's Adam state 4 ways.
# `python -m pretrain.train --config configs/pretrain_1b.yaml --dry-run --world-size 16`
# estimates 8.5 GiB per GPU (bf16 weights and grads 0.6 GiB each, fp32 Adam share 0.9 GiB,
# activations 6.4 GiB at micro-batch 4 x 2048): an 80 GB H100 has room for a larger
# micro-batch; this layout is chosen for throughput headroom, not because memory forces it.
#
# One task per GPU through srun (not torchrun): each rank is a direct child of slurmstepd, so
# SLURM's signals reach every rank, each rank's exit status reaches srun (exit 75 =
# "checkpointed on a stop signal" survives to this script), and there is no second agent
# with its own restart policy between SLURM and the ranks.
#
# Lifecycle: preflight (config, data, run directory on this node; then every node: reach
# MASTER_ADDR, same code, GPUs visible) -> srun training -> on SIGUSR1 (sent by SLURM
# --signal seconds before the time limit) or SIGTERM: forwarded to every rank, which finish
# the step, checkpoint and exit 75 -> `scontrol requeue`; the requeued job resumes from the
# newest complete checkpoint in RUN_DIR. A crash is requeued too, up to MAX_RESTARTS.
#
# Environment (all optional): CONFIG, OVERRIDES (space-separated section.key=value),
# RUN_DIR, PYTHON, MAX_RESTARTS, RANK_EXIT_GRACE (s a rank may outlive the first rank to
# exit), PREFLIGHT_TIMEOUT, EXPECT_GPUS (per node; default: SLURM's), MASTER_ADDR,
# MASTER_PORT. Nodes, tasks, GPUs and time come from sbatch's own flags, which override
# the header below.
#
#SBATCH --job-name=pretrain-1b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$REPO" || exit 2
CONFIG=${CONFIG:-configs/pretrain_1b.yaml}
RUN_DIR=${RUN_DIR:-runs/pretrain_1b}
OVERRIDES=${OVERRIDES:-}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
MAX_RESTARTS=${MAX_RESTARTS:-20}
RANK_EXIT_GRACE=${RANK_EXIT_GRACE:-120}
PREFLIGHT_TIMEOUT=${PREFLIGHT_TIMEOUT:-120}
EXIT_REQUEUE=75  # pretrain/errors.py EXIT_REQUEUE; the statuses: docs/failures.md
RESTART=${SLURM_RESTART_COUNT:-0}
NTASKS=${SLURM_NTASKS:-1}
NNODES=${SLURM_NNODES:-1}
# GPUs each node must show: SLURM's count for this job (0 on a CPU allocation).
EXPECT_GPUS=${EXPECT_GPUS:-${SLURM_GPUS_ON_NODE:-0}}

mkdir -p "$RUN_DIR/logs"
LOG_PREFIX="$RUN_DIR/logs/job${SLURM_JOB_ID:-local}.restart${RESTART}"
DRIVER_LOG="$LOG_PREFIX.driver.log"
say() { echo "[$(date '+%F %T')] $*" | tee -a "$DRIVER_LOG"; }

# Rendezvous: the first host of the allocation and a port derived from the job id.
MASTER_ADDR=$("$PYTHON" -m launch.env master-addr) || exit 2
MASTER_PORT=$("$PYTHON" -m launch.env master-port) || exit 2
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Since SLURM 22.05 srun no longer inherits sbatch's --cpus-per-task; without this every rank
# would get one CPU for its data-loading threads.
export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-1}}
# NCCL: fail a hung collective instead of waiting forever (the watchdog tears the process
# down, srun's --wait ends the others). Pick the fabric explicitly where auto-detection
# chooses the wrong interface: NCCL_SOCKET_IFNAME (e.g. ib0 or eth0), NCCL_IB_HCA (mlx5).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# shellcheck disable=SC2206  # OVERRIDES is a space-separated list by design
ARGS=(--config "$CONFIG" "run.dir=$RUN_DIR" $OVERRIDES)
say "job ${SLURM_JOB_ID:-local} restart $RESTART: $NNODES node(s), $NTASKS task(s), config $CONFIG, run $RUN_DIR, master $MASTER_ADDR:$MASTER_PORT"

# ---- preflight: fail before any GPU-hour is spent --------------------------------------
if ! "$PYTHON" -m pretrain.train "${ARGS[@]}" --dry-run --world-size "$NTASKS" >>"$DRIVER_LOG" 2>&1; then
    say "preflight failed (config, data or run directory); not requeued:"
    grep -E "error" "$DRIVER_LOG" | tail -n 3 >&2
    exit 2
fi
if ! srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=0 \
        "$PYTHON" -m launch.preflight --expect-gpus "$EXPECT_GPUS" --timeout "$PREFLIGHT_TIMEOUT" \
        >>"$DRIVER_LOG" 2>&1; then
    say "preflight failed on the nodes; not requeued:"
    grep "preflight:" "$DRIVER_LOG" | tail -n 3 >&2
    exit 3
fi

# ---- training ----------------------------------------------------------------------------
SRUN_PID=""
# shellcheck disable=SC2317  # invoked by the traps below
forward() {  # SLURM signals this script (--signal=B:...); the ranks must hear it
    say "got SIG$1; forwarding to the ranks (they checkpoint and exit $EXIT_REQUEUE)"
    if [ -n "$SRUN_PID" ]; then kill -"$1" "$SRUN_PID" 2>/dev/null; fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# --kill-on-bad-exit=0 + --wait: ranks stopping together on a signal all exit 75 and srun
# reports 75; after a crash the survivors are killed RANK_EXIT_GRACE seconds later.
srun --kill-on-bad-exit=0 --wait="$RANK_EXIT_GRACE" --output="$LOG_PREFIX.rank%t.log" \
    "$PYTHON" -m pretrain.train "${ARGS[@]}" &
SRUN_PID=$!
while true; do
    wait "$SRUN_PID"
    RC=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break  # wait returned for a trapped signal: wait again
done
say "training exited with status $RC"
# The statuses and what each means: docs/failures.md "Exit statuses" (pretrain/errors.py).

case "$RC" in
    0)
        say "run finished"
        exit 0 ;;
    "$EXIT_REQUEUE")
        say "checkpointed on a stop signal; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0 ;;
    2)
        say "configuration, data, checkpoint or non-finite-loss problem (see $LOG_PREFIX.rank0.log); not requeued"
        exit 2 ;;
    *)
        if [ "$RESTART" -lt "$MAX_RESTARTS" ]; then
            say "crash (status $RC); requeueing (restart $((RESTART + 1)) of at most $MAX_RESTARTS)"
            scontrol requeue "$SLURM_JOB_ID"
            exit 0
        fi
        say "crash (status $RC) after $RESTART restarts; giving up"
        exit "$RC" ;;
esac
