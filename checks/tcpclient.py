"""Where checks/http.py finds the check kit until it imports `lbha.checkkit` itself."""

from lbha.checkkit import CheckFailed, Progress, matches, printable, quote
from lbha.checkkit.tcp import RECEIVE_SIZE, open_tcp, run_exchange, start_tls, tls_context

__all__ = ["RECEIVE_SIZE", "CheckFailed", "Progress", "matches", "open_tcp", "printable",
           "quote", "run_exchange", "start_tls", "tls_context"]
