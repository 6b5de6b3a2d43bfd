"""The reasoning split (r1kit.data.reasoning): each rule of the module docstring on a hand-written case."""

import pytest

from r1kit.data.reasoning import ReasoningSplit, split_reasoning

CASES = [
    # (completion, think_in_prompt, reasoning, content)
    ("2+2 is 4.\n</think>\n\n\\boxed{4}", True, "2+2 is 4.", "\\boxed{4}"),          # R1 prefill: no opening tag
    ("<think>\n2+2 is 4.\n</think>\n\\boxed{4}", False, "2+2 is 4.", "\\boxed{4}"),   # opening tag dropped
    ("  <think>a</think>b", True, "a", "b"),                                          # opening tag in output too
    ("still thinking about 2+2", True, "still thinking about 2+2", None),            # never closed
    ("<think>still thinking", False, "still thinking", None),
    ("a</think>b</think>c", True, "a", "b</think>c"),                                # first close wins
    ("a</think>b", False, None, "a</think>b"),                                       # nothing opened it: content
    ("a </think> b <think>c</think> d", False, None, "a </think> b <think>c</think> d"),  # close before any open
    ("The answer is \\boxed{4}.", False, None, "The answer is \\boxed{4}."),        # plain template, no tags
    ("Sure. <think>2+2</think> 4", False, "2+2", "Sure. 4"),                         # text before the tag is kept
    ("<think></think>4", False, "", "4"),                                            # empty reasoning is "", not None
    ("</think>", True, "", ""),
    ("", True, "", None),
    ("", False, None, ""),
    ("\n<think>\n\n</think>\n\n", False, "", ""),
    ("Sure. <think>2+2", False, "2+2", "Sure."),                                    # lead kept, never closed
]


@pytest.mark.parametrize("text,think_in_prompt,reasoning,content", CASES)
def test_split_reasoning(text, think_in_prompt, reasoning, content):
    assert split_reasoning(text, think_in_prompt) == ReasoningSplit(reasoning, content)


def test_reasoning_span_offsets():
    from r1kit.data.reasoning import ReasoningSpan, reasoning_span

    text = "Sure. <think>ab</think> c"
    assert reasoning_span(text) == ReasoningSpan(6, 13, 15, 23)
    assert reasoning_span("ab</think>c", True) == ReasoningSpan(0, 0, 2, 10)
    assert reasoning_span("abc", True) == ReasoningSpan(0, 0, 3, None)
    assert reasoning_span("a</think>b") is None
