"""Rewrite tests/golden/losses.json from the current code (and cut tokens.u16 once).

    python -m tests.golden.regenerate --reason "why the numerics changed"
    python -m tests.golden.regenerate --measure   # re-measure the figures the tolerance rests on

Use it only when a change is meant to alter the model's numerics, and put the reason in the
commit message: the file is the reference that catches every other change. It refuses to
run under another torch minor version than the one the Makefile pins.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from tests.golden import runs


def cut_tokens() -> None:
    """Once: the first SAMPLES x (SEQ_LEN + 1) tokens of the embedded corpus."""
    from pretrain.data.embedded import embedded_tokens

    tokens, _ = embedded_tokens()
    tokens[:runs.SAMPLES * (runs.SEQ_LEN + 1)].astype("<u2").tofile(runs.TOKENS)


# Runs whose distance from the golden losses the tolerance is set from: the spread over CPU
# kernel paths and thread counts (must stay below it) and three one-knob model changes (must
# stay >= 10x above it).
SPREAD = {
    "cap_default": ("one_process", [], {"ATEN_CPU_CAPABILITY": "default"}),
    "cap_avx2": ("one_process", [], {"ATEN_CPU_CAPABILITY": "avx2"}),
    "cap_avx512": ("one_process", [], {"ATEN_CPU_CAPABILITY": "avx512"}),
    "threads2": ("one_process", [], {"OMP_NUM_THREADS": "2"}),
    "tp2pp2_cap_default": ("tp2_pp2", [], {"ATEN_CPU_CAPABILITY": "default"}),
    "tp2pp2_threads2": ("tp2_pp2", [], {"OMP_NUM_THREADS": "2"}),
}
MODEL_CHANGES = {
    "init_std 0.02->0.021": ("one_process", ["model.init_std=0.021"], {}),
    "norm_eps 1e-5->1e-6": ("one_process", ["model.norm_eps=1e-6"], {}),
    "rotary_base 10000->20000": ("one_process", ["model.rotary_base=20000"], {}),
}


def measure(golden: dict) -> dict:
    """max |loss - golden| over the steps, for every run of SPREAD and MODEL_CHANGES."""
    out = {"how": f"max |loss - golden| over the {runs.STEPS} steps, torch "
                  f"{torch.__version__}, python -m tests.golden.regenerate --measure"}
    with tempfile.TemporaryDirectory() as tmp:
        for group, variants in (("kernel_and_thread_spread", SPREAD),
                                ("model_changes", MODEL_CHANGES)):
            out[group] = {}
            for name, (layout, extra, env) in variants.items():
                workdir = Path(tmp) / name.replace(" ", "_")
                workdir.mkdir()
                losses = runs.run_layout(workdir, layout, extra, env)
                out[group][name] = max(abs(a - b) for a, b in zip(losses, golden[layout]))
                print(f"{group}: {name}: {out[group][name]:.2e}", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reason", help="why the golden losses change (required to rewrite them)")
    parser.add_argument("--measure", action="store_true",
                        help="only re-measure the spread and model-change figures")
    parser.add_argument("--cut-tokens", action="store_true",
                        help="also (re)cut tokens.u16 from this Python's embedded corpus")
    args = parser.parse_args(argv)
    if args.measure:
        golden = runs.read_golden()
        golden["measured"] = measure(golden["losses"])
        runs.LOSSES.write_text(json.dumps(golden, indent=1) + "\n")
        return 0
    if not args.reason:
        parser.error("--reason is required to rewrite the golden losses")
    if args.cut_tokens or not runs.TOKENS.exists():
        cut_tokens()
    old = runs.read_golden() if runs.LOSSES.exists() else {}
    golden = {"torch": torch.__version__.split("+")[0], "reason": args.reason,
              "tolerance": old.get("tolerance"), "measured": old.get("measured"), "losses": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for layout in runs.LAYOUTS:
            golden["losses"][layout] = runs.run_layout(Path(tmp), layout)
            print(f"{layout}: final loss {golden['losses'][layout][-1]!r}")
    runs.LOSSES.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {runs.LOSSES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
