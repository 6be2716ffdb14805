"""The app's run queue: one active run per visitor, the rest wait in one global line whose place the page shows.

    ticket = RUNS.join(visitor)        # refused when this visitor already has a run running or waiting
    RUNS.ahead(ticket)                 # runs ahead of this one; 0 means it may start
    RUNS.leave(ticket)                 # when it ends, is cancelled, or the visitor leaves

WORKBENCH_MAX_ACTIVE_RUNS (default 1) runs go at once: on a small Space two runs would only share
the same cores and both take twice as long, while the figures of each would be disturbed.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from workbench.errors import WorkbenchError


@dataclass(eq=False)
class Ticket:
    visitor: str
    cancelled: threading.Event = field(default_factory=threading.Event)


class RunQueue:
    def __init__(self, slots: int | None = None):
        self.slots = slots or int(os.environ.get("WORKBENCH_MAX_ACTIVE_RUNS", "1") or 1)
        self._lock = threading.Lock()
        self._line: list[Ticket] = []  # running ones first, in arrival order

    def join(self, visitor: str) -> Ticket:
        with self._lock:
            if any(t.visitor == visitor for t in self._line):
                raise WorkbenchError("you already have a run running or waiting; one run per visitor at a time "
                                     "(cancel it, or wait until it ends)")
            ticket = Ticket(visitor)
            self._line.append(ticket)
            return ticket

    def ahead(self, ticket: Ticket) -> int:
        """How many runs must start before this one can (0: it may run now)."""
        with self._lock:
            if ticket not in self._line:
                return 0
            return max(0, self._line.index(ticket) - self.slots + 1)

    def leave(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket in self._line:
                self._line.remove(ticket)

    def waiting(self) -> int:
        with self._lock:
            return max(0, len(self._line) - self.slots)


RUNS = RunQueue()
