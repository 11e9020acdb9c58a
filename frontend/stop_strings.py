"""Stop strings over streamed text.

Text arrives in deltas, and a stop string may span several of them. The matcher holds
back the longest suffix that could still grow into a stop string, so no character at or
after a stop string is ever emitted; the held text is released once it can no longer
match, or by `flush` at the end of generation. Generation stops at the first point where
any stop string is complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StopMatch:
    text: str  # safe to emit
    stopped: bool  # a stop string was found; `text` ends just before it


class StopStringMatcher:
    def __init__(self, stop_strings: Sequence[str]) -> None:
        if any(not stop for stop in stop_strings):
            raise ValueError("stop strings must not be empty")
        self._stops = tuple(stop_strings)
        self._longest = max((len(stop) for stop in self._stops), default=0)
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, delta: str) -> StopMatch:
        if self._stopped:
            return StopMatch("", True)
        text = self._held + delta
        stop_at = self._earliest_stop(text)
        if stop_at is not None:
            self._held = ""
            self._stopped = True
            return StopMatch(text[:stop_at], True)
        keep = self._partial_stop_length(text)
        self._held = text[len(text) - keep:]
        return StopMatch(text[:len(text) - keep], False)

    def flush(self) -> str:
        """Releases the held-back text (generation ended without completing a stop string)."""
        if self._stopped:
            return ""
        held, self._held = self._held, ""
        return held

    def _earliest_stop(self, text: str) -> int | None:
        """Where the stop string that completes first begins (the longer one on a tie).

        Going by where a match ends, not where it begins, gives the same answer however the
        text is split into deltas, as if it were fed one character at a time.
        """
        matches = [(position + len(stop), position) for stop in self._stops if (position := text.find(stop)) >= 0]
        return min(matches)[1] if matches else None

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        for length in range(min(len(text), self._longest - 1), 0, -1):
            suffix = text[len(text) - length:]
            if any(stop.startswith(suffix) for stop in self._stops):
                return length
        return 0
