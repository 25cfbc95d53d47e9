"""Stop strings: how much decoded text is safe to show, in time linear in what is scanned.

A stop string may arrive split over several tokens, so text that could still become one is
held back. `split_held` decides, for the held text, what to show, what to keep holding and
whether a stop string completed; it scans each stop string's KMP automaton once over the
held text (O(len(held)) per stop string, the failure tables cached), where checking every
prefix of every stop string against the text's end costs O(len(stop)**2).
"""
from __future__ import annotations

import functools
from typing import Sequence

MAX_STOPS = 16  # stop strings per request
MAX_STOP_CHARS = 256  # characters per stop string


def check_stops(stop: Sequence[str]) -> None:
    """Raise ValueError unless `stop` holds at most MAX_STOPS strings of at most
    MAX_STOP_CHARS characters each."""
    if len(stop) > MAX_STOPS:
        raise ValueError(f"stop strings: at most {MAX_STOPS} are allowed, got {len(stop)}")
    for s in stop:
        if len(s) > MAX_STOP_CHARS:
            raise ValueError(f"stop strings: at most {MAX_STOP_CHARS} characters each, got one of {len(s)}")


@functools.lru_cache(maxsize=1024)
def _failure(s: str) -> tuple[int, ...]:
    """KMP failure table: fail[i] = length of the longest proper prefix of s[:i + 1] that is
    also its suffix."""
    fail = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return tuple(fail)


def _scan(text: str, s: str) -> tuple[int, int]:
    """Run s's automaton over text. Returns (end of s's first occurrence in text, or -1;
    the longest suffix of text that is a proper prefix of s, if s does not occur)."""
    fail, k = _failure(s), 0
    for i, ch in enumerate(text):
        while k and ch != s[k]:
            k = fail[k - 1]
        if ch == s[k]:
            k += 1
            if k == len(s):
                return i + 1, 0
    return -1, k


def split_held(held: str, stops: Sequence[str], *, final: bool = False) -> tuple[str, str, bool]:
    """Split text held back from the client by the stop strings.

    Args:
        held: decoded text not yet shown (it holds no complete stop string shown earlier:
            every occurrence of one lies inside it).
        stops: non-empty stop strings.
        final: nothing more will come: hold nothing back.
    Returns:
        (text to show now, text to keep holding, whether a stop string completed). When one
        did, the text to show ends where the earliest occurrence of any stop string starts
        and nothing is held.
    """
    cut, keep = -1, 0
    for s in stops:
        end, k = _scan(held, s)
        if end >= 0 and (cut < 0 or end - len(s) < cut):
            cut = end - len(s)
        keep = max(keep, k)
    if cut >= 0:
        return held[:cut], "", True
    if final:
        keep = 0
    return held[:len(held) - keep], held[len(held) - keep:], False
