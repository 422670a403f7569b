"""Graceful stop: the first SIGINT/SIGTERM finishes the step and checkpoints; a second one stops at once."""

from __future__ import annotations

import signal
import sys
import threading

from tqdm.auto import tqdm


class StopOnSignal:
    """Within the block, the first SIGINT/SIGTERM sets ``requested``; a second one raises
    KeyboardInterrupt at once. Previous handlers come back on exit. (Handlers can only be set
    from the main thread; elsewhere this does nothing.)"""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.requested:
            self._restore()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")
        self.requested = True
        tqdm.write(
            f"okd: {signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
        )

    def _restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        self._restore()
        return False
