"""`python -m lbha`."""

import sys

from lbha.cli import main

sys.exit(main())
