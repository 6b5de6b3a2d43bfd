"""The reasoning split: a completion's text → (reasoning, content), DeepSeek-R1 parser semantics.

One definition, used by the rejection sampler (which filters on the reasoning), SFT data readers
(which re-render it) and the server (whose streaming parser must agree with it on every output).
The rules (SERVE_SPEC §3; vLLM ``deepseek_r1_reasoning_parser.py``, SGLang ``force_reasoning``):

- ``think_in_prompt``: the prompt ends inside ``<think>`` (R1's ``<think>\\n`` prefill), so the output
  usually has no opening tag: everything up to the first ``</think>`` is reasoning, the rest content.
- An opening ``<think>`` at the start of the output (after white space) is dropped and opens the
  reasoning, whatever the prompt did.
- No ``</think>`` at all while reasoning: the whole output is reasoning, content ``None`` (a budget
  spent on thinking stays visible as such, never moved into the content).
- Text after the first ``</think>`` is content, even if it holds another literal ``</think>``.
- Neither the prompt nor the output opened the reasoning (a plain template, no opening tag before
  any ``</think>``): the whole output is content, a literal ``</think>`` included. (vLLM takes the
  text before a bare ``</think>`` as reasoning; that cannot be streamed, since every plain answer
  would have to be held back until its end in case a ``</think>`` comes. A model whose template
  opens the reasoning in the prompt is the ``think_in_prompt`` case above.)
- No tags at all and no ``<think>`` in the prompt: all content, reasoning ``None``.
- An opening tag after some text (``"Sure. <think>…</think> 4"``): r1kit's choice, where vLLM
  drops the leading text: nothing is dropped; the text before the tag is kept at the front of the
  content (``"Sure. 4"`` with the reasoning between the tags).

Reasoning and content are stripped of surrounding white space; an empty string becomes ``None``
only for content that does not exist (no closing tag), never for an empty ``<think></think>``
(reasoning ``""``).
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class ReasoningSplit:
    """A completion split at its reasoning tags.

    Attributes:
        reasoning: the text inside the reasoning, stripped; None when the output has none.
        content: the answer after the reasoning, stripped; None when the reasoning never closed.
    """

    reasoning: str | None
    content: str | None


@dataclass(frozen=True)
class ReasoningSpan:
    """Where the reasoning lies in a completion (character offsets into it).

    Attributes:
        start: where the reasoning block begins (its opening tag, or 0 when the prompt opened it).
        inner: where the reasoning text begins (after the opening tag, if any).
        close: where the closing tag begins (len(text) when there is none).
        end: just after the closing tag; None when the reasoning never closed.
    """

    start: int
    inner: int
    close: int
    end: int | None


def reasoning_span(text: str, think_in_prompt: bool = False) -> ReasoningSpan | None:
    """The reasoning block of ``text`` by the rules in the module docstring; None when it has none."""
    lead_ws = len(text) - len(text.lstrip())
    if text.startswith(THINK_OPEN, lead_ws):
        start, inner = lead_ws, lead_ws + len(THINK_OPEN)
    elif think_in_prompt:
        start = inner = 0
    else:
        open_at, close_at = text.find(THINK_OPEN), text.find(THINK_CLOSE)
        if open_at < 0 or 0 <= close_at < open_at:
            return None
        start, inner = open_at, open_at + len(THINK_OPEN)
    close = text.find(THINK_CLOSE, inner)
    if close < 0:
        return ReasoningSpan(start, inner, len(text), None)
    return ReasoningSpan(start, inner, close, close + len(THINK_CLOSE))


def split_reasoning(text: str, think_in_prompt: bool = False) -> ReasoningSplit:
    """Split ``text`` (a completion, without the prompt) into reasoning and content by the rules in the
    module docstring. ``think_in_prompt``: the rendered prompt ends inside an open ``<think>``."""
    span = reasoning_span(text, think_in_prompt)
    if span is None:
        return ReasoningSplit(None, text.strip())
    reasoning = text[span.inner : span.close].strip()
    lead = text[: span.start].strip()
    if span.end is None:
        return ReasoningSplit(reasoning, lead or None)
    rest = text[span.end :]
    return ReasoningSplit(reasoning, (lead + " " + rest.lstrip()).strip() if lead else rest.strip())
