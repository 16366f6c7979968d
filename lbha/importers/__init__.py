"""Importers from ldirectord.cf and Linux-HA heartbeat files."""

from lbha.importers.importer import import_files, import_ldirectord, import_paths
from lbha.importers.report import ImportFormatError, ImportNote, ImportResult, Severity

__all__ = [
    "ImportFormatError",
    "ImportNote",
    "ImportResult",
    "Severity",
    "import_files",
    "import_ldirectord",
    "import_paths",
]
