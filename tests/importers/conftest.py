"""Fixtures for importer tests: Debian 12's shipped example files, and config validation."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from lbha.config import load_config_text
from lbha.importers import ImportResult
from lbha.model import Config

DATA = Path(__file__).parent / "data"
CACHE = Path(__file__).resolve().parents[2] / ".cache" / "debs"
PACKAGES = ("ldirectord", "heartbeat")


def _download(target: Path) -> str | None:
    """apt-get download the packages into target; None on success, else the error text."""
    command = ["apt-get", "download", *PACKAGES]
    try:
        run = subprocess.run(command, cwd=target, capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            # The package lists may be missing or stale in a fresh container.
            subprocess.run(["apt-get", "update"], capture_output=True, timeout=300, check=False)
            run = subprocess.run(command, cwd=target, capture_output=True, text=True,
                                 timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if run.returncode == 0 else run.stderr.strip()


@pytest.fixture(scope="session")
def debian_examples() -> dict[str, str]:
    """Example files of Debian 12's ldirectord and heartbeat packages, by short name."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("apt-get / dpkg-deb not available: cannot fetch Debian's example files")
    CACHE.mkdir(parents=True, exist_ok=True)
    if not all(list(CACHE.glob(f"{name}_*.deb")) for name in PACKAGES):
        error = _download(CACHE)
        if error is not None:
            pytest.skip(f"apt-get download {' '.join(PACKAGES)} failed (no network?): {error}")
    root = CACHE / "root"
    if not root.exists():
        for deb in CACHE.glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    docs = root / "usr" / "share" / "doc"
    files = {
        "ldirectord.cf": docs / "ldirectord" / "examples" / "ldirectord.cf",
        "ha.cf": docs / "heartbeat" / "ha.cf.gz",
        "haresources": docs / "heartbeat" / "haresources.gz",
        "authkeys": docs / "heartbeat" / "authkeys",
    }
    found = {}
    for name, path in files.items():
        if not path.exists():
            pytest.fail(f"Debian package layout changed: {path} is missing")
        data = path.read_bytes()
        found[name] = (gzip.decompress(data) if path.suffix == ".gz" else data).decode()
    return found


@pytest.fixture
def validated() -> Callable[[ImportResult], Config]:
    """Checks that generated TOML passes lbha's own validation; returns the Config."""

    def check(result: ImportResult) -> Config:
        return load_config_text(result.toml, "<imported>")

    return check
