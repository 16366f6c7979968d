"""What an import produced: the TOML text, notes about every difference, and hard errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from lbha.errors import LbhaError


class Severity(StrEnum):
    #: The directive has no lbha equivalent; it is only kept as a comment.
    DROPPED = "dropped"
    #: Imported, but lbha will behave differently or the value was rewritten.
    CHANGED = "changed"
    #: Imported as written, yet the source looks wrong (ldirectord/heartbeat may reject it).
    WARNING = "warning"
    #: Could not be imported (e.g. a hostname); the generated config lacks this part.
    ERROR = "error"


_COMMENT_PREFIX = {
    Severity.DROPPED: "not imported",
    Severity.CHANGED: "changed",
    Severity.WARNING: "warning",
    Severity.ERROR: "NOT IMPORTED (error)",
}


@dataclass(frozen=True)
class ImportNote:
    """One remark about one source line. `text` is the source line, None when it holds secrets."""

    file: str
    line: int | None
    directive: str
    message: str
    severity: Severity
    text: str | None = None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line is not None else self.file

    def __str__(self) -> str:
        return f"{self.where}: {self.severity}: {self.directive}: {self.message}"

    def as_comment(self) -> str:
        """The note as one comment line for the generated TOML (without the '#')."""
        shown = self.text if self.text is not None else self.directive
        return f"{_COMMENT_PREFIX[self.severity]} ({self.where}): {shown} -- {self.message}"


@dataclass(frozen=True)
class ImportResult:
    """The generated TOML, the notes about it, and authkeys key material kept out of the TOML."""

    toml: str
    notes: list[ImportNote] = field(default_factory=list)
    #: Contents for the lbha key file (lines "ID KEY"), to be written with mode 0600.
    auth_key: str | None = field(default=None, repr=False)

    @property
    def errors(self) -> list[ImportNote]:
        return [note for note in self.notes if note.severity is Severity.ERROR]


@dataclass(frozen=True)
class FormatProblem:
    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.message}"


class ImportFormatError(LbhaError):
    """A source file cannot be parsed at all; lists every such problem, each with file and line."""

    def __init__(self, problems: list[FormatProblem]) -> None:
        self.problems = tuple(problems)
        count = len(problems)
        head = f"cannot import: {count} syntax error{'s' if count != 1 else ''}"
        super().__init__("\n".join([head, *(f"  {p}" for p in problems)]))


class Collector:
    """Gathers notes and syntax errors while several files are converted."""

    def __init__(self) -> None:
        self.notes: list[ImportNote] = []
        self.problems: list[FormatProblem] = []

    def note(
        self,
        file: str,
        line: int | None,
        directive: str,
        message: str,
        severity: Severity,
        text: str | None = None,
    ) -> ImportNote:
        found = ImportNote(file, line, directive, message, severity, text)
        self.notes.append(found)
        return found

    def fail(self, file: str, line: int | None, message: str) -> None:
        self.problems.append(FormatProblem(file, line, message))

    def raise_if_failed(self) -> None:
        if self.problems:
            raise ImportFormatError(self.problems)
