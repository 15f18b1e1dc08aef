"""CHATGOT_JAX_NO_SKIPS=1 (set by CI) turns any skipped test into a failed session."""

import os
import pathlib
import shutil
import subprocess
import sys

from conftest import NO_SKIPS, ROOT

# A test skipped while it runs, one skipped for lack of an OS privilege (tolerated), a
# module skipped at import (as test_convert.py is without torch), a test that passes,
# and an expected failure (not a skip).
SKIPPING = '''
import pytest

def test_runs():
    pass

def test_skips():
    pytest.skip("not here")

def test_cannot_mount():
    pytest.skip("environment: no mount rights here")  # tolerated: an OS privilege

@pytest.mark.xfail(strict=True)
def test_xfails():
    assert False
'''
SKIPPED_MODULE = '''
import pytest
pytest.importorskip("chatgot_jax_no_such_module")

def test_never_runs():
    pass
'''


def run_pytest(tmp_path, no_skips: str | None):
    """pytest on the two files in tmp_path, beside a copy of this suite's conftest."""
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    (tmp_path / "test_skipped_module.py").write_text(SKIPPED_MODULE)
    shutil.copy(pathlib.Path(ROOT, "tests", "conftest.py"), tmp_path / "conftest.py")
    env = dict(os.environ)
    env.pop(NO_SKIPS, None)
    if no_skips is not None:
        env[NO_SKIPS] = no_skips
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_skips_fail_the_session_when_refused(tmp_path):
    proc = run_pytest(tmp_path, "1")
    assert proc.returncode == 1, proc.stdout[-2000:]
    [line] = [line for line in proc.stdout.splitlines() if NO_SKIPS in line]
    assert line == (f"error: {NO_SKIPS}=1 and 2 test(s) skipped: test_skipped_module.py, "
                    f"test_skipping.py::test_skips")
    assert "1 passed, 3 skipped, 1 xfailed" in proc.stdout


def test_skips_pass_otherwise(tmp_path):
    for value in (None, "0"):
        proc = run_pytest(tmp_path, value)
        assert proc.returncode == 0, proc.stdout[-2000:]
        assert NO_SKIPS not in proc.stdout
        assert "1 passed, 3 skipped, 1 xfailed" in proc.stdout


def test_ci_refuses_skips():
    ci = pathlib.Path(ROOT, ".ci", "run").read_text().splitlines()
    assert f"export {NO_SKIPS}=1" in ci
    assert ci.index(f"export {NO_SKIPS}=1") < ci.index("python3 -m pytest -q")
