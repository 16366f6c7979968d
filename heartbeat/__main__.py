"""`python -m lbha.heartbeat COMMAND --config FILE`: see lbha.heartbeat.cli."""

import sys

from lbha.heartbeat.cli import main

if __name__ == "__main__":
    sys.exit(main())
