"""The syntax of ldirectord.cf, as ldirectord 4.12's `read_config` reads it (see docs/spec
ldirectord-cf.md): column-0 globals, virtual blocks indented by >= 4 spaces or a tab, a blank
line ends a block, '#' rules. What a directive means is for `lbha.importers.ldirectord`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lbha.importers.report import Collector, Severity


@dataclass
class Line:
    """One `name = value` directive; `raw` is the value before '#' comments were cut."""

    name: str
    value: str
    number: int
    text: str
    raw: str | None = None
    #: A global written without '=' (only `supervised` may be).
    bare: bool = False


@dataclass
class Block:
    head: Line
    lines: list[Line] = field(default_factory=list)


def lex(text: str, source: str, out: Collector) -> tuple[list[Line], list[Block]]:
    """Split the file into global lines and virtual blocks, as ldirectord's read loop does."""
    globals_: list[Line] = []
    blocks: list[Block] = []
    block: Block | None = None
    ended_by_blank = False
    crlf_noted = False
    for number, full in enumerate(text.split("\n"), start=1):
        if full.endswith("\r"):
            full = full[:-1]
            if not crlf_noted:
                crlf_noted = True
                out.note(source, number, "(file)", "CRLF line endings: ldirectord rejects every "
                         "yes/no directive in such a file; imported as if they were LF",
                         Severity.WARNING)
        head = re.match(r"^virtual(6)?\s*=\s*(.*)$", full)
        if head:
            block = Block(Line("virtual6" if head.group(1) else "virtual", head.group(2),
                               number, full.strip()))
            blocks.append(block)
            continue
        if block is not None:
            if re.match(r"^\s*#", full):
                continue
            cut = re.sub(r"#.*", "", full).replace("\t", "    ")
            inner = re.match(r"^ {4,}(\S.*)$", cut)
            if inner:
                parsed = re.match(r"^([a-z0-9_]+)\s*=\s*(.*)$", inner.group(1))
                if parsed is None:
                    out.fail(source, number, f"unknown directive {inner.group(1).strip()!r} in "
                             "a virtual block")
                    continue
                raw = re.match(r"^\s*[a-z0-9_]+\s*=\s*(.*)$", full)
                block.lines.append(Line(parsed.group(1), parsed.group(2), number, full.strip(),
                                        raw.group(1) if raw else None))
                continue
            ended_by_blank = not cut.strip()
            block = None
        if not full.strip() or re.match(r"^\s*#", full):
            continue
        if full[0].isspace():
            why = ("a blank line ended the virtual block above" if ended_by_blank else
                   "virtual block lines need >= 4 spaces or a tab" if blocks else
                   "global directives start in column 0")
            out.fail(source, number, f"indented line outside a virtual block ({why}): "
                     f"{full.strip()!r}")
            continue
        parsed = re.match(r"^([a-z0-9_]+)\s*(?:=\s*(.*))?$", full)
        if parsed is None:
            out.fail(source, number, f"unknown directive {full.strip()!r}")
            continue
        value = parsed.group(2)
        globals_.append(Line(parsed.group(1), value or "", number, full.strip(),
                             bare=value is None))
    return globals_, blocks

