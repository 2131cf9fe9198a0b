from __future__ import annotations

from appliance.engines.stops import StopMatcher


def run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out, hit = [], False
    for p in pieces:
        text, hit = m.feed(p)
        out.append(text)
        if hit:
            break
    if not hit:
        out.append(m.flush())
    return "".join(out), hit


def test_stop_split_across_pieces_never_leaks() -> None:
    assert run(["<end>"], ["Hello <e", "n", "d> world"]) == ("Hello ", True)


def test_partial_prefix_that_is_not_a_stop_is_released() -> None:
    assert run(["<end>"], ["a <e", "x", " b"]) == ("a <ex b", False)
    assert run(["<end>"], ["tail <en"]) == ("tail <en", False)


def test_earliest_of_several_stops_wins() -> None:
    assert run(["bb", "a"], ["xxbba"]) == ("xx", True)


def test_no_stops_passes_everything() -> None:
    assert run([], ["a", "b"]) == ("ab", False)


def test_held_text_is_not_emitted_early() -> None:
    m = StopMatcher(["STOP"])
    assert m.feed("go ST") == ("go ", False)
    assert m.feed("O") == ("", False)
    assert m.feed("P!") == ("", True)
