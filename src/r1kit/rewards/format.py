"""The format reward: reasoning in ``<think>…</think>``, then a marked final answer.

DeepSeek-R1 §2.2.2 ("format rewards") rewards a completion that puts its thinking process between
``<think>`` and ``</think>``; R1-Zero's template then asks for ``<answer>…</answer>``, the chat
templates for ``\\boxed{}``. Either answer marker counts here, so one reward serves both templates.
"""

from __future__ import annotations

import re
from typing import Sequence

from r1kit.data.base import Example
from r1kit.rewards.math import last_boxed

_ANSWER_BLOCK = re.compile(r"\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def is_well_formatted(completion: str, think_in_prompt: bool = False) -> bool:
    """True when the completion is ``<think>`` reasoning ``</think>`` followed by an answer.

    Args:
        completion: the generated text.
        think_in_prompt: the prompt already ended with ``<think>`` (an assistant prefix), so the
            completion starts inside the reasoning.

    The reasoning must be non-empty and hold no other think tag. After ``</think>`` comes either
    exactly one ``<answer>non-empty</answer>`` block (whitespace around it allowed, nothing else), or
    text with a non-empty ``\\boxed{…}``.
    """
    text = ("<think>" + completion) if think_in_prompt else completion.lstrip()
    if not text.startswith("<think>") or text.count("<think>") != 1 or text.count("</think>") != 1:
        return False
    reasoning, answer = text[len("<think>") :].split("</think>")
    if not reasoning.strip():
        return False
    block = _ANSWER_BLOCK.fullmatch(answer)
    if block is not None:
        return bool(block.group(1).strip()) and "<answer>" not in block.group(1)
    boxed = last_boxed(answer)
    return "<answer>" not in answer and boxed is not None and bool(boxed.strip())


class FormatReward:
    """1.0 for a well-formatted completion (``is_well_formatted``), else 0.0. Logged as
    ``rewards/format``.

    Args:
        think_in_prompt: the template's assistant prefix already opened ``<think>``.
    """

    name = "format"

    def __init__(self, think_in_prompt: bool = False):
        self.think_in_prompt = think_in_prompt

    def __call__(self, completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
        return [float(is_well_formatted(c, self.think_in_prompt)) for c in completions]
