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


@pytest.mark.parametrize("command", [c for c in shown_commands() if not c.startswith("chatgot-")])
def test_command_help(command):
    proc = subprocess.run([sys.executable, *command.split(), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:") and "--debug" in proc.stdout


def test_the_console_scripts_shown_are_the_modules_shown():
    """Each chatgot-X the docs show is a console script (pyproject.toml) whose module the
    docs also show as python -m (tested above with --help), or train.py / sample.py; the
    installed scripts themselves run in test_package.py."""
    import tomllib

    scripts = tomllib.loads(pathlib.Path(ROOT, "pyproject.toml").read_text())["project"][
        "scripts"]
    shown = shown_commands()
    for name in (c for c in shown if c.startswith("chatgot-")):
        module = scripts[name].split(":")[0]
        assert (f"-m {module}" in shown or module in ("chatgot_jax.train_cli",
                                                       "chatgot_jax.sample_cli")), name
