"""lbha: HA cluster manager and health-check engine for Linux load balancers."""

from lbha.hookspecs import hookimpl

__all__ = ["hookimpl"]
__version__ = "0.1.0"
