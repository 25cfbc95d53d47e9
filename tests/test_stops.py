"""tpmax.generation.stops against its definition (a naive scan of every prefix), and its bound on time."""
import time

import pytest
from hypothesis import given, settings, strategies as st

from tpmax.generation.sampling import SamplingParams
from tpmax.generation.stops import MAX_STOP_CHARS, MAX_STOPS, check_stops, split_held


def naive(held: str, stops, final: bool):
    """The definition: cut at the earliest occurrence of any stop string; otherwise hold the
    longest end of the text that begins some stop string."""
    found = [held.find(s) for s in stops if s in held]
    if found:
        return held[:min(found)], "", True
    keep = 0 if final else max((k for s in stops for k in range(1, len(s)) if held.endswith(s[:k])), default=0)
    return held[:len(held) - keep], held[len(held) - keep:], False


text = st.text(alphabet="ab\u00e9\U0001f600", max_size=40)


@settings(derandomize=True, max_examples=500, deadline=None)
@given(text, st.lists(st.text(alphabet="ab\u00e9\U0001f600", min_size=1, max_size=8), min_size=1, max_size=4),
       st.booleans())
def test_split_held_equals_the_definition(held, stops, final):
    assert split_held(held, stops, final=final) == naive(held, stops, final)


@settings(derandomize=True, max_examples=200, deadline=None)
@given(st.lists(text, max_size=10), st.lists(st.text(alphabet="ab", min_size=1, max_size=6), min_size=1, max_size=3))
def test_streamed_pieces_show_what_the_whole_text_shows(pieces, stops):
    """Fed piece by piece (as tokens arrive), the text shown is the whole text cut at the
    earliest stop string, whatever the split."""
    held, shown, stopped = "", "", False
    for p in pieces:
        out, held, stopped = split_held(held + p, stops)
        shown += out
        if stopped:
            break
    if not stopped:
        out, held, stopped = split_held(held, stops, final=True)
        shown += out
    assert (shown, stopped) == naive("".join(pieces), stops, True)[::2]


def test_a_long_stop_string_is_linear():
    """The hold-back scan of a maximal stop string over a maximal held text takes a few
    thousand steps, not len(stop)**2 / 2 string comparisons of up to len(stop) characters."""
    stop = "a" * (MAX_STOP_CHARS - 1) + "b"
    held = "a" * (MAX_STOP_CHARS - 1)
    assert split_held(held, [stop] * MAX_STOPS) == ("", held, False)
    big = "a" * 300_000 + "b"  # beyond the bound, still linear: the 300 KB stop string
    t0 = time.process_time()
    assert split_held("a" * 300_000, [big]) == ("", "a" * 300_000, False)
    assert time.process_time() - t0 < 10  # the quadratic check took minutes; here about 0.1 s


def test_bounds():
    check_stops(["x" * MAX_STOP_CHARS] * MAX_STOPS)
    with pytest.raises(ValueError, match="at most 16 are allowed"):
        check_stops(["x"] * (MAX_STOPS + 1))
    with pytest.raises(ValueError, match="at most 256 characters"):
        check_stops(["x" * (MAX_STOP_CHARS + 1)])


def test_sampling_params_bound_stop_strings_and_temperature():
    """The bounds hold wherever sampling parameters are made (server, CLI, API)."""
    with pytest.raises(ValueError, match="^stop strings: at most 16"):
        SamplingParams(stop=["x"] * (MAX_STOPS + 1))
    with pytest.raises(ValueError, match="^temperature must be 0 \\(greedy\\) or at least"):
        SamplingParams(temperature=1e-310)
    assert SamplingParams(temperature=1e-4, stop=("x" * MAX_STOP_CHARS,) * MAX_STOPS).temperature == 1e-4
