"""Every code block of the README runs as written: the Python blocks in the default run (each in a fresh
namespace, as a reader pasting it would), the shell lines that run on a CPU behind ``-m slow`` (outputs redirected
to a temporary folder so tracked results stay as they are); the others are listed with the reason they are not
run here."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```", README, flags=re.S | re.M)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
SHELL = [line for lang, code in BLOCKS if lang == "bash" for line in code.splitlines()
         if line.strip() and not line.strip().startswith("#")]

# Shell lines not run by this test, and why.
NOT_HERE = {
    "python3 -m venv": "the Quick start: the second line is .ci/run itself, the first is measured from a fresh clone "
                       "(README, with its time and memory)",
    "--device cuda": "needs a GPU",
    "--nproc_per_node=4": "needs 4 GPUs",
    "--nnodes=2": "needs two machines",
    "python -m pytest -q": "the suite itself",
}


LAUNCHERS = {"python": [], "pytest": ["-m", "pytest"], "rfm-fast": ["-m", "rfm_fast"],
             "torchrun": ["-m", "torch.distributed.run"]}


def test_the_readme_has_its_blocks():
    assert len(PYTHON) >= 4 and len(SHELL) >= 8, (len(PYTHON), len(SHELL))


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_block_runs_as_written(index, capsys):
    code = PYTHON[index]
    if "import xrfm" in code and importlib.util.find_spec("xrfm") is None:
        pytest.skip("needs xrfm (pip install 'rfm_fast[xrfm]')")
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})


def _runnable(line: str):
    for key, reason in NOT_HERE.items():
        if key in line:
            return None, reason
    return line, None


@pytest.mark.slow
@pytest.mark.parametrize("line", SHELL)
def test_shell_line_runs_as_written(line, tmp_path):
    command, reason = _runnable(line)
    if command is None:
        pytest.skip(reason)
    command = command.split("  #")[0].strip()
    words = shlex.split(command)
    if "--out" in words:  # write into tmp_path, not over the tracked reference results
        words[words.index("--out") + 1] = str(tmp_path / "out")
    if words[0] in LAUNCHERS:  # the same programs, from this interpreter
        words = [sys.executable, *LAUNCHERS[words[0]], *words[1:]]
    done = subprocess.run(words, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
