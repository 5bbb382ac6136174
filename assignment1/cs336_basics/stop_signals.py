"""Stop a long run cleanly on Ctrl-C (SIGINT) or a scheduler's SIGTERM (SLURM, Kubernetes, a
preemptible cloud VM).

The first signal only sets `StopSignals.received`. The training loop reads it between steps,
finishes the step it is in, evaluates, writes a checkpoint and returns, so ``--resume auto`` goes
on exactly where it stopped. The handlers that were in place before come back as soon as the first
signal arrives, so a second one acts as it always did: Ctrl-C raises ``KeyboardInterrupt`` at once
(nothing more is written), SIGTERM's default ends the process.

    with StopSignals() as stop:
        for step in ...:
            ...
            if stop.received is not None:
                ...  # evaluate, checkpoint, return
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Self


class StopSignals:
    """A context that turns the first SIGINT or SIGTERM into a flag.

    ``received`` is ``None`` until a signal arrives, then its ``signal.Signals`` member (its exit
    status, by the shell's convention, is ``128 + received``). Python runs signal handlers only in
    the main thread: elsewhere (a training run started from a worker thread) nothing is installed
    and ``received`` stays ``None``. ``announce`` prints one line to stderr when a signal arrives
    (off for all but one rank of a multi-process run).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool = True):
        self.announce = announce
        self.received: signal.Signals | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum)
        self._restore()
        if self.announce:
            print(f"\n{self.received.name} received: stopping after this step (evaluation, then a checkpoint); "
                  "send it again to stop at once without them", file=sys.stderr, flush=True)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            # (None: a handler installed outside Python; the default is the closest we can put back)
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
