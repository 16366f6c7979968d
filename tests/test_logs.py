"""Log lines: journal priority prefixes, levels, and secrets never printed."""

from __future__ import annotations

import io
import logging
import os
import tempfile

import pytest

from lbha.config import load_config_text
from lbha.logs import redact_secrets, setup_logging, stream_is_journal

CONFIG = """\
[[virtual]]
address = "198.18.0.100"
ports = 389
[virtual.check]
login = "cn=admin"
password = "ldap-pw-123"
[[virtual.real]]
address = "198.18.0.21"
[[virtual.real]]
address = "198.18.0.22"
[virtual.real.check]
request = "dc=example"
[alerts.email]
to = ["ops@example.org"]
password = "smtp-pw"
"""


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_secrets_are_redacted_in_messages_and_tracebacks() -> None:
    stream = io.StringIO()
    setup_logging("debug", stream)
    redact_secrets(load_config_text(CONFIG).secrets())
    log = logging.getLogger("lbha.test")
    log.info("binding with %s", "ldap-pw-123")
    try:
        raise ValueError("smtp said no to smtp-pw")
    except ValueError:
        log.exception("alert failed")
    text = stream.getvalue()
    assert "ldap-pw-123" not in text
    assert "smtp-pw" not in text
    assert "binding with ****" in text
    assert "smtp said no to ****" in text


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
