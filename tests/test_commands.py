"""Every command that README.md and docs/ show answers --help (the docs name real commands):
python train.py, python -m chatgot_jax..., and the console scripts (chatgot-train, ...)."""

import pathlib
import re
import subprocess
import sys

import pytest

from conftest import ROOT

DOCS = [pathlib.Path(ROOT, "README.md"), *sorted(pathlib.Path(ROOT, "docs").glob("*.md"))]
COMMAND = re.compile(r"python3? (-m chatgot_jax[\w.]*|train\.py|sample\.py)|`(chatgot-(?!jax\b)[a-z]+)")


def shown_commands() -> list[str]:
    found = set()
    for path in DOCS:
        found.update(m[1] or m[2] for m in COMMAND.finditer(path.read_text(encoding="utf-8")))
    return sorted(found)


def test_the_docs_show_every_command():
    assert {"train.py", "sample.py", "-m chatgot_jax.convert", "-m chatgot_jax.tools.bench",
            "-m chatgot_jax.tools.params", "-m chatgot_jax.plot", "chatgot-train",
            "chatgot-sample", "chatgot-sweep"} <= set(shown_commands())


@pytest.mark.parametrize("command", shown_commands())
def test_command_help(command):
    if command.startswith("chatgot-"):  # a console script, beside this interpreter
        argv = [str(pathlib.Path(sys.executable).parent / command)]
    else:  # ["-m", "module"] or ["train.py"]
        argv = [sys.executable, *command.split()]
    proc = subprocess.run([*argv, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:") and "--debug" in proc.stdout
