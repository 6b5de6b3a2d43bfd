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
- Neither tag opened the reasoning (a plain template, no opening tag first) but a ``</think>``
  appears: the text before it is reasoning (a model that omitted the opening tag), as vLLM does.
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


def split_reasoning(text: str, think_in_prompt: bool = False) -> ReasoningSplit:
    """Split ``text`` (a completion, without the prompt) into reasoning and content by the rules in the
    module docstring. ``think_in_prompt``: the rendered prompt ends inside an open ``<think>``."""
    body = text.lstrip()
    lead = ""
    opened = think_in_prompt
    if body.startswith(THINK_OPEN):
        body, opened = body[len(THINK_OPEN):], True
    elif not think_in_prompt:
        open_at, close_at = body.find(THINK_OPEN), body.find(THINK_CLOSE)
        if open_at > 0 and (close_at < 0 or open_at < close_at):
            lead, body, opened = body[:open_at], body[open_at + len(THINK_OPEN):], True
    reasoning, sep, rest = body.partition(THINK_CLOSE)
    if not sep:
        if opened:
            return ReasoningSplit(reasoning.strip(), lead.strip() or None)
        return ReasoningSplit(None, text.strip())
    content = (lead.rstrip() + " " + rest.lstrip()).strip() if lead.strip() else rest.strip()
    return ReasoningSplit(reasoning.strip(), content)
