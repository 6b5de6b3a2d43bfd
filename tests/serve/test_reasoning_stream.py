"""The streaming reasoning parser equals ``split_reasoning`` of the whole text, however the text is cut:
every single cut, every pair of cuts around the tags, character by character; stop strings apply to
the content only; choices keep separate state."""

from __future__ import annotations

import pytest

from r1kit.data.reasoning import ReasoningSplit, split_reasoning
from r1kit.serve.reasoning import ReasoningStream, partial_tag_length, stop_prefix_length

# (completion, think_in_prompt): with and without the opening tag, empty reasoning, cut off inside the
# reasoning, literal tags inside the answer, text before the opening tag, plain answers.
OUTPUTS = [
    ("2+2 is 4.\n</think>\n\nThe answer is \\boxed{4}.", True),
    ("<think>\n2+2 is 4.\n</think>\n\nThe answer is 4.", False),
    ("<think>\n2+2 is 4.\n</think>\n\nThe answer is 4.", True),
    ("<think></think>4", False),
    ("\n</think>\n\n4", True),
    ("still thinking about 2+", True),
    ("<think>still thinking", False),
    ("a</think>b</think>c <think>d", True),
    ("<think>x</think>use </think> and <think> literally", False),
    ("Sure. <think>2+2</think>  4", False),
    ("Sure. <think>2+2", False),
    ("a </think> b <think>c</think> d", False),
    ("The answer is 4.", False),
    ("<thinking is hard> no </thinker>", False),
    ("  \n<think> <  </think> <", False),
    ("", True),
    ("", False),
]


def run(pieces: list[str], think_in_prompt: bool, stop=(), **kw) -> tuple[ReasoningStream, str, str]:
    """Feed ``pieces``, finish; returns the stream and the concatenated reasoning and content deltas."""
    stream = ReasoningStream(think_in_prompt, stop, **kw)
    reasoning = content = ""
    for p in pieces:
        r, c = stream.feed(p)
        reasoning, content = reasoning + r, content + c
    r, c = stream.finish()
    return stream, reasoning + r, content + c


def cuts_around_tags(text: str) -> list[int]:
    """Every character boundary within 2 characters of a tag (or of the whole text, when short)."""
    near = set()
    for tag in ("<think>", "</think>"):
        at = text.find(tag)
        while at >= 0:
            near.update(range(max(0, at - 2), min(len(text), at + len(tag) + 2) + 1))
            at = text.find(tag, at + 1)
    return sorted(near) or list(range(len(text) + 1))


@pytest.mark.parametrize("text,think_in_prompt", OUTPUTS)
def test_stream_equals_the_whole_split_at_every_cut(text, think_in_prompt):
    whole = split_reasoning(text, think_in_prompt)
    splits = [[text], list(text)] + [[text[:i], text[i:]] for i in range(len(text) + 1)]
    near = cuts_around_tags(text)
    splits += [[text[:i], text[i:j], text[j:]] for i in near for j in near if i < j]
    for pieces in splits:
        stream, reasoning, content = run(pieces, think_in_prompt)
        assert stream.result == whole, pieces
        assert reasoning == (whole.reasoning or "") and content == (whole.content or ""), pieces


STOP_CASES = [
    # (completion, think_in_prompt, stop, reasoning, content, stopped)
    ("Question: what? 4\n</think>\nIt is 4.\nQuestion: next", True, ["Question:"], "Question: what? 4", "It is 4.", True),
    ("Question: what?</think>It is 4.", True, ["Question:"], "Question: what?", "It is 4.", False),
    ("<think>ab</think>The answer is 4.", False, ["is"], "ab", "The answer", True),
    ("<think>ab</think>The answer is 4.", False, ["The"], "ab", "", True),
    ("plain answer END more", False, ["END"], None, "plain answer", True),
    ("still thinking END", True, ["END"], "still thinking END", None, False),
    ("<think>x</think>ab", False, ["abc"], "x", "ab", False),  # a held prefix of a stop that never came
]


@pytest.mark.parametrize("text,think_in_prompt,stop,reasoning,content,stopped", STOP_CASES)
def test_stop_strings_apply_to_the_content_only(text, think_in_prompt, stop, reasoning, content, stopped):
    for pieces in [[text], list(text)] + [[text[:i], text[i:]] for i in range(len(text) + 1)]:
        stream, got_r, got_c = run(pieces, think_in_prompt, stop)
        assert stream.result == ReasoningSplit(reasoning, content) and stream.stopped == stopped, pieces
        assert (got_r, got_c) == (reasoning or "", content or ""), pieces


@pytest.mark.parametrize("text,think_in_prompt", OUTPUTS)
@pytest.mark.parametrize("stop", [["two"], ["</"], ["nk>"], ["4", "is"]])
def test_stop_in_reasoning_equals_the_split_of_the_text_before_the_stop(text, think_in_prompt, stop):
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    whole = split_reasoning(text[: min(hits)] if hits else text, think_in_prompt)
    for pieces in [[text], list(text)] + [[text[:i], text[i:]] for i in range(len(text) + 1)]:
        stream, reasoning, content = run(pieces, think_in_prompt, stop, stop_in_reasoning=True)
        assert stream.result == whole and stream.stopped == bool(hits), pieces
        assert (reasoning, content) == (whole.reasoning or "", whole.content or ""), pieces


def test_choices_do_not_share_state():
    a, b = ReasoningStream(True), ReasoningStream(True)
    a.feed("one</thi")
    b.feed("two ")
    assert a.feed("nk>x") == ("", "x") and b.feed("more") == (" more", "")
    a.finish(), b.finish()
    assert a.result == ReasoningSplit("one", "x") and b.result == ReasoningSplit("two more", None)


def test_held_back_lengths():
    assert [partial_tag_length(t) for t in ("a<", "a</thi", "a<think", "a<think>", "a</think>", "ab")] == [1, 5, 6, 0, 0, 0]
    assert stop_prefix_length("the Ques", ["Question:"]) == 4 and stop_prefix_length("x", ["ab"]) == 0
