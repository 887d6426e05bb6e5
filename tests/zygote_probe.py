"""Prints what a process started by tests/zygote.py sees of itself, as one JSON line, then
exits with the status given (or waits for a signal): tests/test_zygote.py compares it with
what a fresh interpreter sees."""

import json
import os
import sys
import tempfile
import time

if __name__ == "__main__":
    import torch

    state = {"argv": sys.argv[1:], "cwd": os.getcwd(), "pid": os.getpid(), "ppid": os.getppid(),
             "sid": os.getsid(0), "pgid": os.getpgid(0), "env": os.environ.get("PROBE_VALUE"),
             "main": __name__, "file": os.path.basename(__file__),
             "torch_threads": torch.get_num_threads(), "stdin_tty": os.isatty(0),
             "rank": os.environ.get("RANK"), "tmp": tempfile.gettempdir(), "world": os.environ.get("WORLD_SIZE")}
    print(json.dumps(state), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if sys.argv[1:2] == ["fail-rank1"]:
        if os.environ.get("RANK") == "1":
            sys.exit(3)
        time.sleep(60)
    if sys.argv[1:2] == ["wait"]:
        time.sleep(60)
    if sys.argv[1:2] == ["raise"]:
        raise RuntimeError("probe failure")
    sys.exit(int(sys.argv[1]) if sys.argv[1:] and sys.argv[1].isdigit() else 0)
