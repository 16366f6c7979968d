"""The rule of tests/conftest.py: a `real_server` test that skips fails where CI is set."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).parent.parent / "conftest.py"
MODULE = '''
import pytest

pytestmark = pytest.mark.real_server


def test_needs_a_daemon():
    pytest.skip("exampled is not installed")
'''


def run(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess[str]:
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_example.py").write_text(MODULE)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": "true"} if ci else {})
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ci", [False, True])
def test_a_missing_server_skips_only_outside_ci(tmp_path: Path, ci: bool) -> None:
    proc = run(tmp_path, ci)
    if ci:
        assert proc.returncode == 1, proc.stdout
        assert "skipped in CI, where the server must be installed" in proc.stdout
        assert "exampled is not installed" in proc.stdout
    else:
        assert proc.returncode == 0, proc.stdout
        assert "1 skipped" in proc.stdout
