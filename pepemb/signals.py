"""SIGINT and SIGTERM become a flag checked between optimizer steps, so a stopped job saves a
checkpoint and exits cleanly instead of dying mid-step."""

from __future__ import annotations

import signal
import sys


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between optimizer steps, so a killed job writes a
    checkpoint and exits cleanly instead of dying mid-step."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            if signum == signal.SIGINT:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            return  # torchrun follows the terminal's Ctrl-C with a SIGTERM: the stop is under way
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
