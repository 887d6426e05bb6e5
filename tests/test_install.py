"""`pip install .` as a user gets it: the wheel is built from a copy of the source tree,
installed (no dependencies, no network) into a fresh venv, and the console scripts run from an
empty directory: tokenizer -> shard -> inspect -> a few training steps of a bundled config.

The venv reuses this interpreter's installed dependencies through a .pth line (no download of
torch again); that line adds the directory only, so the checkout's own editable install (a
.pth file in there) is not processed and `pretrain` can only come from the wheel.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pretrain", "launch", "data_tools", "configs", "pyproject.toml", "README.md")
SCRIPTS = ("pretrain-train", "pretrain-evaluate", "pretrain-export-hf", "pretrain-plan",
           "pretrain-plot", "pretrain-tokenizer", "pretrain-shard", "pretrain-inspect",
           "pretrain-export-corpus", "pretrain-curate")



def _distribution_name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_imported_package_is_declared():
    """Each third-party module the package imports belongs to a dependency of pyproject.toml
    (required or an extra), so `pip install .` cannot miss one."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {_distribution_name(r) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        declared |= {_distribution_name(r) for r in extra}
    owners = packages_distributions()
    own = {"pretrain", "launch", "data_tools"}
    missing = set()
    for top in own:
        for path in (REPO / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for root in {name.split(".")[0] for name in names} - own - set(sys.stdlib_module_names):
                    dists = {d.lower().replace("_", "-") for d in owners.get(root, [root])}
                    if not dists & declared:
                        missing.add(f"{root} ({path.relative_to(REPO)})")
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"


def _run(cmd: list[str], cwd: Path, env: dict | None = None, expect: int = 0, timeout=300):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect, (f"{cmd[0]} exited {proc.returncode}:\n"
                                       f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv holding the wheel built from this checkout."""
    root = tmp_path_factory.mktemp("install")
    source = root / "src"
    source.mkdir()
    for name in SOURCES:  # a copy: the build writes build/ and *.egg-info beside the sources
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, source / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", str(root / "dist"), str(source)], cwd=root)
    wheel = next((root / "dist").glob("pretrain-*.whl"))
    env_dir = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], cwd=root)
    python = env_dir / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                cwd=root).stdout.strip()
    Path(site, "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: the dependencies' directory holds this checkout's editable
    # `pretrain` dist-info, which pip may otherwise take as "already satisfied".
    installed = _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index",
                      "--ignore-installed", str(wheel)], cwd=root)
    assert (Path(site) / "pretrain" / "__init__.py").is_file(), installed.stdout + installed.stderr
    return env_dir


def _env(venv: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               PYTHONNOUSERSITE="1")
    return env


@pytest.mark.install
def test_installed_tools_end_to_end(venv, tmp_path):
    env = _env(venv)
    work = tmp_path / "empty"
    work.mkdir()
    found = _run(["python", "-c", "import pretrain, data_tools.shard_lib; print(pretrain.__file__)"],
                 work, env).stdout
    assert found.startswith(str(venv)), f"pretrain imported from {found}, not from the wheel"
    for script in SCRIPTS:
        assert (venv / "bin" / script).is_file(), f"{script} not installed"

    rows = [{"text": f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i}\n"} for i in range(300)]
    Path(work, "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _run(["pretrain-tokenizer", "--input", "corpus.jsonl", "--vocab-size", "300",
          "--output", "tok"], work, env)
    _run(["pretrain-shard", "--input", "corpus.jsonl", "--output", "data", "--tokenizer",
          "tok.model", "--seq-len", "32", "--val-fraction", "0.1", "--num-workers", "1",
          "--no-progress"], work, env)
    assert "train:" in _run(["pretrain-inspect", "data", "--samples", "1"], work, env).stdout
    _run(["pretrain-train", "--config", "smoke", "data.train=data", "run.dir=run",
          "train.steps=2", "train.global_batch_size=2", "train.log_interval=1"], work, env)
    metrics = [json.loads(line) for line in Path(work, "run", "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]

    for script in ("pretrain-evaluate", "pretrain-export-hf", "pretrain-plan", "pretrain-plot",
                   "pretrain-export-corpus"):  # the entry points the flow above does not run
        assert "usage:" in _run([script, "--help"], work, env).stdout
    bad = _run(["pretrain-train", "--config", "nosuch"], work, env, expect=2)
    assert "nosuch" in bad.stderr and "smoke" in bad.stderr and "1b" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
