"""The output stage: thinking and tool calls split from the answer, markers never shown."""

from mlxserve.engine.channels import ChannelSplitter, Piece

THINK = ("<think>", "</think>")
CALL = ("<tool_call>", "</tool_call>")


def _run(splitter: ChannelSplitter, chunks: list[str]) -> list[Piece]:
    pieces = [p for c in chunks for p in splitter.feed(c)] + splitter.finish()
    merged: list[Piece] = []
    for p in pieces:  # adjacent text of one channel read as one
        if merged and merged[-1].channel == p.channel != "tool":
            merged[-1] = Piece(p.channel, merged[-1].text + p.text)
        else:
            merged.append(p)
    return merged


def test_thinking_opened_by_the_prompt_goes_to_reasoning_until_the_end_marker():
    pieces = _run(ChannelSplitter(THINK, None, reasoning_first=True), ["Let me", " think.</th", "ink>The answer", " is 4."])
    assert pieces == [Piece("reasoning", "Let me think."), Piece("normal", "The answer is 4.")]


def test_a_marker_split_across_chunks_is_held_back_and_never_shown():
    pieces = _run(ChannelSplitter(THINK, CALL, reasoning_first=False),
                  ["Sure. <to", "ol_call>\n{\"name\": \"f\"}\n</tool", "_call>"])
    assert pieces == [Piece("normal", "Sure. "), Piece("tool", "\n{\"name\": \"f\"}\n")]


def test_blank_text_between_calls_is_not_an_answer():
    pieces = _run(ChannelSplitter(None, CALL, reasoning_first=False),
                  ["<tool_call>a</tool_call>", "\n\n", "<tool_call>b</tool_call>", "\n"])
    assert pieces == [Piece("tool", "a"), Piece("tool", "b")]


def test_blank_text_between_words_is_kept():
    pieces = _run(ChannelSplitter(None, CALL, reasoning_first=False), ["Hello", " ", "\n", "world"])
    assert pieces == [Piece("normal", "Hello \nworld")]


def test_a_call_cut_short_is_handed_over_at_the_end():
    pieces = _run(ChannelSplitter(None, CALL, reasoning_first=False), ["<tool_call>{\"name\": \"f\", "])
    assert pieces == [Piece("tool", "{\"name\": \"f\", ")]


def test_without_markers_text_passes_through():
    pieces = _run(ChannelSplitter(None, None, reasoning_first=False), ["<think>not a", " marker here</think>"])
    assert pieces == [Piece("normal", "<think>not a marker here</think>")]
