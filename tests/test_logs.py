"""Log lines: journal priority prefixes and levels, written as logged.

No secret is searched for in finished lines: the code handling a secret writes a placeholder
at the source (tests/checks/test_radius.py runs a daemon with failing checks and reads its log).
"""

from __future__ import annotations

import io
import logging
import os
import tempfile

import pytest

from lbha.logs import setup_logging, stream_is_journal


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_level_filters() -> None:
    stream = io.StringIO()
    setup_logging("warning", stream)
    logging.getLogger("lbha.test").info("hidden")
    logging.getLogger("lbha.test").warning("shown")
    assert "hidden" not in stream.getvalue()
    assert "WARNING lbha.test: shown" in stream.getvalue()


def test_journal_gets_priority_prefixes(monkeypatch: pytest.MonkeyPatch) -> None:
    with tempfile.TemporaryFile("w+") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert stream_is_journal(stream)
        setup_logging("debug", stream)
        log = logging.getLogger("lbha.test")
        log.error("peer dead")
        log.debug("tick")
        stream.seek(0)
        assert stream.read().splitlines() == ["<3>lbha.test: peer dead", "<7>lbha.test: tick"]


def test_not_journal_when_env_names_another_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    assert not stream_is_journal(io.StringIO())
