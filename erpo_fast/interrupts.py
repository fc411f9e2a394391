"""Ctrl-C during a training run: stop within a step, never lose it, never cost the checkpoint being written.

Python turns SIGINT into a KeyboardInterrupt wherever the main thread happens to be, and libraries do not all let
it through: torch.distributed.checkpoint catches every exception of a save and re-raises it as its own
CheckpointException (a crash with a traceback instead of "interrupted"), and an interrupt that lands in code
which drops it lets the run go on as if nothing happened. `CtrlC` keeps Python's behaviour and adds two things:

- it remembers the press, so `check()` at each step boundary stops a run whose KeyboardInterrupt something
  swallowed, and an exception that leaves the block after the press (a library's wrapping of the interrupt, a
  clean-up failing on a pipe read the interrupt cut short) leaves it as KeyboardInterrupt;
- inside `deferred()` (a checkpoint being written) the first press waits until the block ends, so the checkpoint
  lands whole before the run stops; a second press stops at once (the half-written checkpoint is discarded, as
  for any failed save).

Outside the main thread (``train()`` called from a worker thread) signal handlers cannot be set: it does nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class CtrlC:
    def __init__(self) -> None:
        self.pressed = False  # SIGINT arrived while installed
        self.deferred_press = False  # ... and arrived inside `deferred()`, which finished its block first
        self._deferring = False
        self._previous = None

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        if self.pressed and isinstance(exc, Exception):
            # Raised because of the interrupt (torch's CheckpointException wraps it; a pipe read it cut short
            # fails in the clean-up): the run stops because of Ctrl-C, and says so.
            raise KeyboardInterrupt from exc

    def _on_sigint(self, signum, frame) -> None:
        if self._deferring and not self.pressed:
            self.pressed = self.deferred_press = True
            return
        self.pressed = True
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self):
        """Run the block to its end even if Ctrl-C is pressed once meanwhile; then stop."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        self.check()

    def check(self) -> None:
        """Raise KeyboardInterrupt if Ctrl-C was pressed (its own KeyboardInterrupt may have been swallowed)."""
        if self.pressed:
            raise KeyboardInterrupt
