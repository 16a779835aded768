from mlxserve.engine.stops import StopMatcher


def feed_all(matcher: StopMatcher, pieces: list[str]) -> tuple[list[str], bool]:
    sent = []
    for piece in pieces:
        text, hit = matcher.feed(piece)
        sent.append(text)
        if hit:
            return sent, True
    sent.append(matcher.flush())
    return sent, False


def test_stop_string_spanning_pieces_is_found_and_never_sent():
    sent, hit = feed_all(StopMatcher(("END",)), ["Hello E", "N", "D and more"])
    assert hit
    assert "".join(sent) == "Hello "
    assert all("E" not in s for s in sent)


def test_partial_match_that_does_not_complete_is_released():
    sent, hit = feed_all(StopMatcher(("END",)), ["a E", "NX", " b"])
    assert not hit
    assert "".join(sent) == "a ENX b"
    assert sent[0] == "a "  # "E" held back until it could not be a stop string


def test_earliest_of_several_stops_wins():
    sent, hit = feed_all(StopMatcher(("world", "lo w")), ["hello world"])
    assert hit and "".join(sent) == "hel"


def test_held_text_is_flushed_at_the_end():
    sent, hit = feed_all(StopMatcher(("\n\n",)), ["line\n"])
    assert not hit and "".join(sent) == "line\n"
    assert sent[0] == "line"


def test_no_stops_passes_everything_through():
    matcher = StopMatcher(())
    assert matcher.feed("abc") == ("abc", False)
    assert matcher.flush() == ""
