"""Ctrl-C during training: finish the current step, save a checkpoint, exit with status 130.

A second Ctrl-C interrupts at once. Under torchrun every rank checks the flag of every
other (`distributed.any_rank`), so all stop after the same step.
"""
from __future__ import annotations

import signal


class StopFlag:
    """SIGINT -> finish the current step, checkpoint, exit (a second Ctrl-C interrupts at once)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False
