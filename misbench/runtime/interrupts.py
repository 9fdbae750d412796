"""Stops that never split a commit: SIGINT/SIGTERM arriving inside an `uninterruptible()` block are
delivered when the block ends, so a resumable file is never left half-committed (a batch written but
not counted, a checkpoint renamed but its .partial still there)."""

__all__ = ["uninterruptible", "terminate_as_interrupt", "committing"]

import contextlib
import signal
import threading

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"depth": 0, "pending": [], "saved": {}}


def _defer(signum, _frame):
    _state["pending"].append(signum)


@contextlib.contextmanager
def uninterruptible():
    """Hold SIGINT and SIGTERM until the block is done (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _state["depth"] == 0:
        _state["saved"] = {s: signal.signal(s, _defer) for s in _SIGNALS}
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if _state["depth"] == 0:
            for s, handler in _state["saved"].items():
                signal.signal(s, handler)
            pending, _state["pending"] = _state["pending"], []
            if pending:  # the handler the process had before the block decides what the stop does
                signal.raise_signal(pending[0])


def committing() -> bool:
    """Whether the main thread is inside an uninterruptible() block (a commit that a stop waits for)."""
    return _state["depth"] > 0


def _terminate(_signum, _frame):
    raise KeyboardInterrupt("SIGTERM")


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM (Slurm pre-emption, `timeout`, `docker stop`) stops like Ctrl-C: cleanly, resumable."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
