"""The one exception type users see: a message that says what was expected and what to do."""

__all__ = ["MisbenchError", "close_matches"]

import difflib


class MisbenchError(Exception):
    """Bad input or an unusable file; the message names the problem and the fix."""


def close_matches(name: str, candidates, n: int = 5) -> str:
    """A 'did you mean' fragment for error messages ('' when nothing is close)."""
    matches = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
    if not matches:
        prefix = [c for c in candidates if c.startswith(name.split(".")[0])][:n]
        matches = prefix
    return f" Close matches: {', '.join(matches)}." if matches else ""
