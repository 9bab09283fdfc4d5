"""Single jobs this producer sent and has not waited for yet, kept so a lost one can be
sent again.

kombu's Redis transport pops a message before it records it as unacked: a worker killed
in that instant drops it (a poison row that kills workers while they fetch a burst of
redelivered messages makes that likelier). While ``Client.wait`` waits, a job still
unfinished after ``LOST_AFTER_S`` (doubling each time) while a job of the same priority
this producer sent after it has finished looks lost, and is sent again with the same id: should both
copies run, the result is the same (one result per job id). The bulk pipeline does the
same for its chunks (``producer/bulk/batch.py``).
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from shared.repository import ModelRef

LOST_AFTER_S = 10.0
MAX_RESENDS = 3
KEPT = 10_000  # jobs remembered; the oldest unwaited ones are forgotten first
LATER_PROBED = 8  # later jobs looked at for evidence that this one was passed by


@dataclass
class Sent:
    seq: int
    ref: ModelRef
    inputs: dict[str, Any]
    priority: str
    deadline: float | None
    replying: bool  # sent with this process's reply channel
    trace: dict[str, str] | None = None  # its submit span's context, for a resend


class InFlight:
    def __init__(self, kept: int = KEPT):
        self.kept = kept
        self._jobs: OrderedDict[str, Sent] = OrderedDict()
        self._lock = threading.Lock()
        self._seq = itertools.count()
        # per priority, the newest job (in send order) seen finished: a high job passing
        # a normal one says nothing about the normal one
        self.finished_seq: dict[str, int] = {}
        self.resent = 0

    def add(self, job_id: str, ref: ModelRef, inputs: dict[str, Any], priority: str,
            deadline: float | None, replying: bool, trace: dict[str, str] | None = None
            ) -> None:
        with self._lock:
            self._jobs[job_id] = Sent(next(self._seq), ref, inputs, priority, deadline,
                                      replying, trace)
            while len(self._jobs) > self.kept:  # submitted, never waited for
                self._jobs.popitem(last=False)

    def pop(self, job_id: str) -> Sent | None:
        with self._lock:
            return self._jobs.pop(job_id, None)

    def finished(self, sent: Sent) -> None:
        with self._lock:
            seen = self.finished_seq.get(sent.priority, -1)
            self.finished_seq[sent.priority] = max(seen, sent.seq)

    def passed(self, sent: Sent) -> bool:
        """Was a job of the same priority sent after ``sent`` seen finished?"""
        with self._lock:
            return self.finished_seq.get(sent.priority, -1) > sent.seq

    def later(self, sent: Sent) -> list[str]:
        """Up to LATER_PROBED jobs of the same priority sent after ``sent``, not waited for
        yet."""
        with self._lock:
            found: list[str] = []
            for job_id, other in reversed(self._jobs.items()):
                if other.seq <= sent.seq or len(found) >= LATER_PROBED:
                    break
                if other.priority == sent.priority:
                    found.append(job_id)
            return found
