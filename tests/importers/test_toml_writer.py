"""The TOML emitter: what it writes must read back as the same values."""

from __future__ import annotations

import tomllib

import pytest

from lbha.importers.toml_writer import Document, format_string


@pytest.mark.parametrize(
    "text",
    ["plain", 'quote " inside', "back\\slash", "both \\ and '", "tab\tand\nnewline",
     "ctrl \x01 \x7f", "unicode é ✓", ""],
)
def test_strings_round_trip(text):
    assert tomllib.loads(f"x = {format_string(text)}")["x"] == text


def test_regex_is_written_as_a_literal_string():
    assert format_string(r"^OK\s+\d+$") == r"'^OK\s+\d+$'"


def test_document_with_comments_round_trips():
    doc = Document()
    top = doc.table()
    top.comment("header\nsecond line \x00")
    doc.table("empty")
    checks = doc.table("checks")
    checks.set("interval", "10s")
    checks.comment("not imported: fork")
    checks.set("interval", "5s")
    virtual = doc.table("virtual", array=True)
    virtual.set("ports", [80, 443])
    virtual.set("weird key", True)
    real = doc.table("virtual.real", array=True)
    real.set("check", {"port": 8080, "receive": "a.b"})
    text = doc.render()
    assert "[empty]" not in text
    assert "# second line ?" in text
    assert tomllib.loads(text) == {
        "checks": {"interval": "5s"},
        "virtual": [{"ports": [80, 443], "weird key": True,
                     "real": [{"check": {"port": 8080, "receive": "a.b"}}]}],
    }
