"""The installable package: an installed copy that needs no checkout, its console scripts,
package data, and imports that go one way (commands -> library, tools -> core)."""

import ast
import os
import pathlib
import site
import subprocess
import sys
import tomllib

import pytest

from chatgot_jax import config as config_lib
from conftest import MICRO_OVERRIDES, ROOT

PACKAGE = pathlib.Path(ROOT, "chatgot_jax")
PYPROJECT = tomllib.loads(pathlib.Path(ROOT, "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]


def imports(path: pathlib.Path) -> set[str]:
    """The modules a file imports (absolute names)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def test_imports_go_one_way():
    """No module imports an entry point (train.py, sample.py); the core library does not
    import its tooling (chatgot_jax.tools); no test or module edits sys.path or
    PYTHONPATH (tests run against the package as installed)."""
    core = [p for p in PACKAGE.rglob("*.py") if "tools" not in p.parts]
    everything = [*PACKAGE.rglob("*.py"), *pathlib.Path(ROOT, "tests").glob("*.py")]
    assert len(core) > 20
    assert [str(p) for p in core if any(m.startswith("chatgot_jax.tools")
                                        for m in imports(p))] == []
    assert [str(p) for p in everything if imports(p) & {"train", "sample"}] == []
    edits = [str(p) for p in everything if p.name != "test_package.py"
             and ("sys.path" in p.read_text() or "PYTHONPATH" in p.read_text())]
    assert edits == []


def test_variants_are_package_data():
    assert config_lib.variants() == ["small", "tiny", "tiny-doc"]
    assert pathlib.Path(str(config_lib.CONFIG_DIR)).parent == PACKAGE  # not the checkout's root
    assert PYPROJECT["tool"]["setuptools"]["package-data"]["chatgot_jax"] == ["configs/*.yaml"]


def test_console_scripts_are_the_commands():
    """Every console script is a command's process entry (cli.command); the README shows
    each, so tests/test_commands.py runs each with --help."""
    import importlib

    from test_commands import shown_commands

    assert {"chatgot-train", "chatgot-sample", "chatgot-sweep", "chatgot-convert",
            "chatgot-plot", "chatgot-bench", "chatgot-evaluate", "chatgot-compare"} <= set(
        SCRIPTS)
    for name, target in SCRIPTS.items():
        module, attr = target.split(":")
        assert getattr(importlib.import_module(module), attr).__qualname__.startswith(
            "command.<locals>"), target
    assert set(SCRIPTS) <= set(shown_commands())


def test_an_installed_copy_needs_no_checkout(tmp_path):
    """pip install of the checkout (not editable) into a fresh venv, then from an empty
    directory: train on the built-in corpus, sample, and load it from Python."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    # The dependencies: those of this interpreter (a .pth file names its site-packages),
    # so that nothing is downloaded; the package itself is installed below, without them.
    [purelib] = (venv / "lib").glob("python3.*/site-packages")
    (purelib / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", ROOT],
                          capture_output=True, text=True, timeout=300)  # deps: the system's
    assert done.returncode == 0, done.stderr[-2000:]
    work = tmp_path / "empty"
    work.mkdir()

    def run(*argv):
        proc = subprocess.run([*map(str, argv)], cwd=work, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PATH": f"{bin_dir}:"
                                                f"{os.environ['PATH']}"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    where = run(python, "-c", "import chatgot_jax; print(chatgot_jax.__file__)")
    assert where.startswith(str(venv)), where  # the installed copy, not the checkout
    run(bin_dir / "chatgot-train", "--max-steps", "2", "--batch-size", "8", "--out", "r",
        "--eval-every", "2", "train.sample_tokens=0", "mesh.data=1", *MICRO_OVERRIDES)
    printed = run(bin_dir / "chatgot-sample", "--checkpoint", "r", "--prompt", "HAMLET: ",
                  "--max-new-tokens", "20", "--temperature", "0")
    generated = run(python, "-c", "import chatgot_jax; m = chatgot_jax.load('r'); "
                    "print(m.generate('HAMLET: ', max_new_tokens=20, temperature=0)[0])")
    assert printed == f"HAMLET: {generated}" and len(generated) == 21


@pytest.mark.parametrize("module", ["chatgot_jax.train_cli", "chatgot_jax.sample_cli"])
def test_the_repositorys_scripts_are_thin(module):
    """train.py and sample.py at the top level only hand over to the package."""
    name = module.rsplit(".", 1)[1].removesuffix("_cli")
    text = pathlib.Path(ROOT, f"{name}.py").read_text()
    assert f"from {module} import command" in text and len(text.splitlines()) < 15
