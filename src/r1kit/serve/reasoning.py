"""The streaming reasoning split of one choice: text deltas in, reasoning and content deltas out.

Whatever way the text is cut into deltas, the concatenated deltas and the final ``result`` equal
``r1kit.data.reasoning.split_reasoning`` of the whole text (SERVE_SPEC §3), because each step
recomputes that split on the text so far and emits only the part no later text can change:

- a trailing partial tag (``"</thi"``) is held back until it completes or turns out to be text
  (a tag split across two deltas: SGLang PR #31009, lmdeploy PR #4754);
- trailing white space is held back (the split strips both ends);
- content that ends in the beginning of a client stop string is held back until it is known not to
  be that string.

Client ``stop`` strings are looked for in the content only, never inside the reasoning (vLLM #52393).
One ``ReasoningStream`` per choice of a request: no state is shared between choices or requests.
"""

from __future__ import annotations

from typing import Sequence

from r1kit.data.reasoning import THINK_CLOSE, THINK_OPEN, ReasoningSplit, split_reasoning


def partial_tag_length(text: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``<think>`` or ``</think>``."""
    for k in range(min(len(text), len(THINK_CLOSE) - 1), 0, -1):
        tail = text[-k:]
        if any(tag != tail and tag.startswith(tail) for tag in (THINK_OPEN, THINK_CLOSE)):
            return k
    return 0


def stop_prefix_length(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of the ``stop`` strings."""
    best = 0
    for s in stop:
        for k in range(min(len(text), len(s) - 1), best, -1):
            if s.startswith(text[-k:]):
                best = k
                break
    return best


class ReasoningStream:
    """Reasoning/content split of one choice, fed text deltas.

    Args:
        think_in_prompt: the rendered prompt ends inside an open ``<think>`` (R1's prefill).
        stop: client stop strings, applied to the content: the content ends before the first one
            found, and the choice is then finished (``stopped``).
        split: False = no reasoning split: the raw text is the content, unstripped (``/v1/completions``).
        stop_in_reasoning: the stop strings end the output wherever they occur, reasoning included
            (the split is then that of the text before the stop string).
    """

    def __init__(self, think_in_prompt: bool, stop: Sequence[str] = (), split: bool = True,
                 stop_in_reasoning: bool = False) -> None:
        self.think_in_prompt, self.split, self.stop_in_reasoning = think_in_prompt, split, stop_in_reasoning
        self.stop = [s for s in stop if s]
        self.text = ""  # every delta fed so far
        self.sent_reasoning = ""
        self.sent_content = ""
        self.stopped = False  # a stop string ended the content
        self.final: ReasoningSplit | None = None

    def _view(self, text: str, final: bool) -> tuple[str | None, str | None, bool]:
        """(reasoning, content, stopped) of ``text``: its split, the content cut at a stop string and,
        unless ``final``, without a trailing beginning of one."""
        if self.stop_in_reasoning and self.split and self.stop:
            return self._view_stop_anywhere(text, final)
        split = split_reasoning(text, self.think_in_prompt) if self.split else ReasoningSplit(None, text)
        content = split.content
        strip = str.rstrip if self.split else str
        if content is not None and self.stop:
            hits = [i for i in (content.find(s) for s in self.stop) if i >= 0]
            if hits:
                return split.reasoning, strip(content[: min(hits)]), True
            if not final:
                content = strip(content[: len(content) - stop_prefix_length(content, self.stop)])
        return split.reasoning, content, False

    def _view_stop_anywhere(self, text: str, final: bool) -> tuple[str | None, str | None, bool]:
        """``_view`` when the stop strings apply to the whole output: the split of the text before the
        first stop string (unless ``final``: before a trailing beginning of one or of a tag)."""
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            split = split_reasoning(text[: min(hits)], self.think_in_prompt)
            return split.reasoning, split.content, True
        if not final:
            text = text[: len(text) - stop_prefix_length(text, self.stop)]
            text = text[: len(text) - partial_tag_length(text)]
        split = split_reasoning(text, self.think_in_prompt)
        return split.reasoning, split.content, False

    def _emit(self, reasoning: str | None, content: str | None) -> tuple[str, str]:
        reasoning, content = reasoning or "", content or ""
        # The split of a longer text extends the split of a shorter one (module docstring).
        assert reasoning.startswith(self.sent_reasoning) and content.startswith(self.sent_content), "split not monotone"
        delta = reasoning[len(self.sent_reasoning):], content[len(self.sent_content):]
        self.sent_reasoning, self.sent_content = reasoning, content
        return delta

    def feed(self, delta: str) -> tuple[str, str]:
        """Add ``delta``; returns the (reasoning, content) text now safe to send (either may be "").
        After a stop string every further delta is ignored."""
        if self.stopped:
            return "", ""
        self.text += delta
        safe = self.text[: len(self.text) - partial_tag_length(self.text)] if self.split else self.text
        reasoning, content, stopped = self._view(safe, final=False)
        if stopped:
            self.stopped, self.final = True, ReasoningSplit(reasoning, content)
        return self._emit(reasoning, content)

    def finish(self) -> tuple[str, str]:
        """End of the choice: returns what was held back; ``result`` is then final."""
        if self.final is None:
            reasoning, content, self.stopped = self._view(self.text, final=True)
            self.final = ReasoningSplit(reasoning, content)
        return self._emit(self.final.reasoning, self.final.content)

    @property
    def result(self) -> ReasoningSplit:
        """The final (reasoning, content); call ``finish`` first."""
        assert self.final is not None, "call finish() first"
        return self.final
