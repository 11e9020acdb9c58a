"""Stop strings over deltas: nothing at or after a stop string is ever emitted."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frontend.stop_strings import StopMatch, StopStringMatcher


def feed_all(matcher: StopStringMatcher, deltas: list[str]) -> list[StopMatch]:
    return [matcher.feed(delta) for delta in deltas]


def test_stop_string_inside_one_delta():
    assert StopStringMatcher(["STOP"]).feed("Hello STOP world") == StopMatch("Hello ", True)


def test_stop_string_across_deltas_is_held_back_then_cut():
    matches = feed_all(StopStringMatcher(["STOP"]), ["Hel", "lo S", "TO", "P and more"])
    assert [m.text for m in matches] == ["Hel", "lo ", "", ""]
    assert [m.stopped for m in matches] == [False, False, False, True]


def test_a_near_miss_is_released_once_it_cannot_match():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("a ST") == StopMatch("a ", False)
    assert matcher.feed("ART") == StopMatch("START", False)


def test_flush_releases_held_text_at_the_end():
    matcher = StopStringMatcher(["</s>"])
    assert matcher.feed("done</") == StopMatch("done", False)
    assert matcher.flush() == "</"


def test_the_stop_string_that_completes_first_wins():
    assert StopStringMatcher(["lo w", "world"]).feed("hello world") == StopMatch("hel", True)
    # "bc" completes before "abcd" would, whatever the chunking.
    assert StopStringMatcher(["abcd", "bc"]).feed("xabcd") == StopMatch("xa", True)


def test_overlapping_prefixes():
    matches = feed_all(StopStringMatcher(["aab"]), list("aaab"))
    assert "".join(m.text for m in matches) == "a" and matches[-1].stopped


def test_nothing_after_a_stop():
    matcher = StopStringMatcher(["x"])
    assert matcher.feed("ax") == StopMatch("a", True)
    assert matcher.feed("more") == StopMatch("", True)
    assert matcher.flush() == ""


def test_without_stop_strings_text_passes_through():
    matcher = StopStringMatcher([])
    assert matcher.feed("anything") == StopMatch("anything", False)


def test_empty_stop_strings_are_refused():
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """One character at a time: cut before the stop string that completes first (the longest on a tie)."""
    for end in range(1, len(text) + 1):
        completed = [stop for stop in stops if text[:end].endswith(stop)]
        if completed:
            return text[:end - max(map(len, completed))], True
    return text, False


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="abc", max_size=30),
       stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3),
       cuts=st.lists(st.integers(min_value=0, max_value=6), max_size=30))
def test_any_chunking_matches_the_character_by_character_reference(text, stops, cuts):
    matcher, emitted, start = StopStringMatcher(stops), [], 0
    for size in [*cuts, len(text)]:
        emitted.append(matcher.feed(text[start:start + size]).text)
        start += size
    expected_text, expected_stop = reference(text, stops)
    assert matcher.stopped == expected_stop
    # Before the flush nothing at or after a stop string may have been emitted.
    assert expected_text.startswith("".join(emitted))
    assert "".join(emitted) + matcher.flush() == expected_text
