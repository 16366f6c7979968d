"""Built-in sink: every event and every new desired table goes to the log."""

from __future__ import annotations

import logging

from lbha import hookimpl
from lbha.desired import DesiredTable
from lbha.events import Event, Severity

log = logging.getLogger("lbha.events")

_LEVELS = {Severity.INFO: logging.INFO, Severity.WARNING: logging.WARNING,
           Severity.CRITICAL: logging.CRITICAL}


@hookimpl
def lbha_event(event: Event) -> None:
    log.log(_LEVELS.get(event.severity, logging.INFO), "%s", event.message)


@hookimpl
def lbha_apply(desired: DesiredTable) -> None:
    if log.isEnabledFor(logging.DEBUG):
        destinations = sum(len(s.destinations) for s in desired.services)
        log.debug("desired table %d: %d services, %d destinations", desired.generation,
                  len(desired.services), destinations)
