"""Preemption: signals only set a flag; ranks agree at the next step boundary, save together and exit "requeue".

Never save from inside a signal handler (it can fire mid-collective). Slurm/submitit send SIGUSR2 before a
preemption or time limit; schedulers send SIGTERM. NCCL swallows SIGUSR1, hence USR2.
"""

from __future__ import annotations

import signal
from types import FrameType

from storms_dist.train.distributed import all_reduce_max

REQUEUE_EXIT_CODE = 75
"""EX_TEMPFAIL: "saved a checkpoint after a preemption signal; run me again". Launchers requeue on it."""

PREEMPTION_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class Preempted(SystemExit):
    """Raised on every rank after the preemption checkpoint is written; exits with REQUEUE_EXIT_CODE."""

    def __init__(self, step: int):
        super().__init__(REQUEUE_EXIT_CODE)
        self.step = step


class PreemptionFlag:
    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS):
        self.received: signal.Signals | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank received a signal (same answer everywhere)."""
        return all_reduce_max([1.0 if self.received is not None else 0.0])[0] > 0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
