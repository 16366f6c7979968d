"""The one way tests run lbha's programs as processes.

`-P`: the working directory (often the checkout, whose `lbha/` folder is only the core) is
not put on sys.path, so the installed package runs, editable or wheel alike.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping

#: The interpreter with lbha installed (LBHA_PYTHON: another one, e.g. a wheel's venv).
PYTHON = os.environ.get("LBHA_PYTHON", sys.executable)
#: `lbha ...`, the CLI.
LBHA = (PYTHON, "-P", "-m", "lbha")
#: `python -m lbha.heartbeat ...`, the heartbeat program.
HEARTBEAT = (PYTHON, "-P", "-m", "lbha.heartbeat")


def lbha(*args: str, timeout: float = 60,
         env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`lbha ARGS`; stdout and stderr captured as text, any exit status."""
    return subprocess.run([*LBHA, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)
