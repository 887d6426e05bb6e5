#!/bin/bash
# Tokenize and shard a corpus on a Ray cluster spread over a SLURM allocation.
#
#   INPUT=/data/raw OUTPUT=/data/shards TOKENIZER=/data/tok.model SEQ_LEN=2048 \
#       sbatch --nodes=4 slurm/shard.sh
#
# The Ray head runs on the first node, one Ray worker on each other node (one srun task per
# node, holding every CPU of it); data_tools/shard.py then runs on the batch node against
# that cluster. Ray is stopped on every node when the script exits, fails, or is cancelled
# (scancel sends SIGTERM first; SIGKILL follows only after KillWait).
# INPUT, OUTPUT and the tokenizer must be on storage that every node sees at the same path.
#
# Environment: INPUT (files, directories or globs, space-separated), OUTPUT, TOKENIZER,
# SEQ_LEN (required); SHARD_ARGS (more shard.py flags), PYTHON, RAY (the `ray` CLI; default
# beside PYTHON), RAY_PORT.
#
#SBATCH --job-name=shard
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$REPO" || exit 2
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
RAY=${RAY:-$(dirname "$PYTHON")/ray}
: "${INPUT:?set INPUT to the raw corpus}" "${OUTPUT:?set OUTPUT to the shard directory}"
: "${TOKENIZER:?set TOKENIZER to PREFIX.model}" "${SEQ_LEN:?set SEQ_LEN}"
SHARD_ARGS=${SHARD_ARGS:-}
RAY_PORT=${RAY_PORT:-$((6379 + ${SLURM_JOB_ID:-0} % 1000))}
NNODES=${SLURM_NNODES:-1}
CPUS=${SLURM_CPUS_ON_NODE:-$(nproc)}

mapfile -t HOSTS < <("$PYTHON" -m launch.env hostnames)
HEAD=${HOSTS[0]:-$(hostname)}
# The batch script runs on the allocation's first node, which hosts the Ray head; its first
# non-loopback address is what the other nodes connect to (RAY_HEAD_IP overrides).
HEAD_IP=${RAY_HEAD_IP:-$(hostname -I | awk '{print $1}')}
ADDRESS="$HEAD_IP:$RAY_PORT"
# Ray's session files under the job's own temp dir, so this job's Ray processes can be told
# apart from anyone else's on the same nodes (and stopped without `ray stop`, which would
# stop every Ray cluster of the user on the node).
RAY_TMP=${RAY_TMP:-/tmp/ray-${SLURM_JOB_ID:-$$}}
say() { echo "[$(date '+%F %T')] shard.sh: $*"; }
# Token authentication: one random token per job, handed to every node's Ray and to the
# drivers in the environment srun passes on (never on disk). Ray's default, ~/.ray/auth_token,
# exists only where some earlier command created it: without it `ray start --head` refused
# to start on a machine that had never run Ray. A RAY_AUTH_TOKEN of the user's wins.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ]; then
    RAY_AUTH_TOKEN=$("$PYTHON" -c 'import secrets; print(secrets.token_hex(32))') || exit 2
    export RAY_AUTH_TOKEN
fi
# Ray's own output, per step, on this node (srun brings the remote tasks' output here): its
# last lines are printed when a node's Ray fails to start.
RAY_LOGS=$(mktemp -d "${TMPDIR:-/tmp}/shard-ray-logs.XXXXXX") || exit 2

export RAY_TMP ADDRESS  # read by stop_ray_here, also on the other nodes

STEP_PIDS=()
# shellcheck disable=SC2317  # invoked by cleanup, here and (through srun) on the other nodes
stop_ray_here() {  # this job's Ray processes on this node, with their whole process groups
    # Found by the head's session directory or the workers' GCS address, then killed by
    # process group: Ray's agents rename themselves (ray::DashboardAgent), ignore SIGTERM
    # for a while and outlive a killed raylet, so a pattern alone misses them. The values
    # come from the environment: a pattern in this shell's own command line would match it.
    local own pids groups="" sig group
    own=$(ps -o pgid= -p $$ | tr -d ' ')
    pids=$(pgrep -d, -f -- "$RAY_TMP|gcs-address=$ADDRESS")
    if [ -n "$pids" ]; then
        groups=$(ps -o pgid= -p "$pids" | tr -d ' ' | sort -u | grep -vx "$own")
    fi
    for sig in TERM KILL; do
        for group in $groups; do kill -"$sig" -- "-$group" 2>/dev/null; done
        if [ "$sig" = TERM ] && [ -n "$groups" ]; then sleep 3; fi
    done
    rm -rf "$RAY_TMP"
}
# shellcheck disable=SC2317  # invoked by the traps below
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    say "stopping Ray"
    stop_ray_here
    if [ "$NNODES" -gt 1 ]; then  # best effort: a cancelled job may not start new steps
        timeout 60 srun --overlap --nodes=$((NNODES - 1)) --ntasks=$((NNODES - 1)) \
            --ntasks-per-node=1 --exclude="$HEAD" \
            bash -c "$(declare -f stop_ray_here); stop_ray_here" >/dev/null 2>&1
    fi
    for pid in "${STEP_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$RAY_LOGS"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' INT TERM

say "Ray head on $HEAD ($ADDRESS), $NNODES node(s), $CPUS CPUs each"
srun --nodes=1 --ntasks=1 -w "$HEAD" \
    "$RAY" start --head --node-ip-address="$HEAD_IP" --port="$RAY_PORT" --num-cpus="$CPUS" \
    --include-dashboard=false --temp-dir="$RAY_TMP" --block >"$RAY_LOGS/0.log" 2>&1 &
STEP_PIDS+=($!)
STEP_NAMES=("the Ray head on $HEAD")
if [ "$NNODES" -gt 1 ]; then
    srun --nodes=$((NNODES - 1)) --ntasks=$((NNODES - 1)) --ntasks-per-node=1 --exclude="$HEAD" \
        --label "$RAY" start --address="$ADDRESS" --num-cpus="$CPUS" --block \
        >"$RAY_LOGS/1.log" 2>&1 &
    STEP_PIDS+=($!)
    STEP_NAMES+=("a Ray worker on the other nodes")
fi

# Wait until every node has joined (the head alone first, then the workers).
for _ in $(seq 120); do
    NODES_UP=$("$PYTHON" - "$ADDRESS" <<'EOF' 2>/dev/null
import logging, sys
import ray
ray.init(address=sys.argv[1], logging_level=logging.ERROR, log_to_driver=False)
print(sum(1 for n in ray.nodes() if n["Alive"]))
EOF
)
    if [ "${NODES_UP:-0}" -ge "$NNODES" ]; then break; fi
    for i in "${!STEP_PIDS[@]}"; do  # a node whose Ray cannot start: fail now, not in minutes
        if ! kill -0 "${STEP_PIDS[$i]}" 2>/dev/null; then
            wait "${STEP_PIDS[$i]}"
            say "${STEP_NAMES[$i]} exited (status $?) before all $NNODES nodes joined; Ray said:"
            grep -v '^[[:space:]]*$' "$RAY_LOGS/$i.log" | tail -n 5 | sed 's/^/    /'
            exit 3
        fi
    done
    sleep 2
done
if [ "${NODES_UP:-0}" -lt "$NNODES" ]; then
    say "only ${NODES_UP:-0} of $NNODES Ray nodes came up at $ADDRESS"
    exit 3
fi
say "Ray cluster up: $NODES_UP node(s)"

# shellcheck disable=SC2086  # INPUT and SHARD_ARGS are space-separated lists by design
"$PYTHON" data_tools/shard.py --input $INPUT --output "$OUTPUT" --tokenizer "$TOKENIZER" \
    --seq-len "$SEQ_LEN" --ray-address "$ADDRESS" --no-progress $SHARD_ARGS
RC=$?
say "shard.py exited with status $RC"
exit "$RC"
