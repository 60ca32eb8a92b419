"""Every benchmark script starts: run as its README line runs it (``python benchmarks/<name>.py``), it parses
``--help`` and exits 0. This catches an import the scripts' folder no longer provides before CI's users do."""

import pathlib
import subprocess
import sys

import pytest

FOLDER = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p for p in FOLDER.glob("*.py") if not p.name.startswith("_"))

# One interpreter for all scripts (one torch import): each runs as __main__ with its own folder first on sys.path,
# exactly as `python benchmarks/<name>.py --help` would.
_RUNNER = """
import runpy, sys
failed = []
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    sys.path.insert(0, path.rsplit("/", 1)[0])
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (0, None):
            failed.append(f"{path}: exit {exc.code}")
    except Exception as exc:
        failed.append(f"{path}: {type(exc).__name__}: {exc}")
    finally:
        sys.path.pop(0)
print("FAILED:" + repr(failed))
"""


def test_there_are_benchmark_scripts():
    assert len(SCRIPTS) >= 5


def test_every_benchmark_script_parses_help():
    out = subprocess.run(
        [sys.executable, "-c", _RUNNER, *map(str, SCRIPTS)], capture_output=True, text=True, timeout=300,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last == "FAILED:[]", last
