"""Prompt templates: how a problem becomes the text the policy continues.

Presets:
    ``r1_zero``: the plain DeepSeek-R1-Zero template (GRPO_SPEC §4, R1 paper Table 1), no chat
        template; the model answers in ``<think>…</think> <answer>…</answer>``.
    ``chat_think``: the tokenizer's chat template; reason in ``<think></think>``, answer in
        ``\\boxed{}``; the assistant turn starts with ``<think>\\n`` (R1's evaluation setting).
    ``chat_boxed``: the chat template with R1's math instruction ("put your final answer within
        \\boxed{}").
    ``direct``: the chat template and an instruction to answer with the final number only, for weak
        models on one-step problems (verify with ``MathVerifier(extraction="any")``).
    ``code``: the chat template and an instruction to answer in one fenced Python block (HumanEval,
        MBPP; checked by the code verifier).
    ``bare``: the problem text itself, for models pretrained on bare problems (r1kit's from-scratch
        DeepSeek-V3 on ``arithmetic``: ``"37+48="`` is continued with ``"85"``).

Pass the rendered text to ``encode_prompt``, which adds the tokenizer's special tokens only when
the text does not already start with its BOS (chat templates usually write it), so BOS never
appears twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from r1kit.data.base import Example
from r1kit.errors import ConfigError

R1_ZERO_SYSTEM = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>."
)


@dataclass(frozen=True)
class PromptTemplate:
    """How to render a problem.

    Attributes:
        name: preset name, for logs and configs.
        system_prompt: system text; None = the chat template's default (plain templates: none).
        instruction: appended to the problem after a blank line ("" = none).
        use_chat_template: render with ``tokenizer.apply_chat_template`` (user turn, generation
            prompt); otherwise the plain R1-Zero layout
            ``"{system_prompt} User: {problem}. Assistant:"``.
        assistant_prefix: text the assistant turn starts with, e.g. ``"<think>\\n"`` (plain
            layout: after one space).
        extraction: the ``MathVerifier`` extraction mode answers in this template need.
        shortest_answer: the shortest completion the template's format accepts; a
            max_completion_length that cannot hold it (plus EOS) is refused before training.
        bare: render the problem text alone (no layout, instruction or chat template).
    """

    name: str
    system_prompt: str | None
    instruction: str
    use_chat_template: bool
    assistant_prefix: str = ""
    extraction: str = "tagged"
    shortest_answer: str = "\\boxed{0}"
    bare: bool = False

    @property
    def think_in_prompt(self) -> bool:
        """The prompt already opens ``<think>`` (pass to ``FormatReward``)."""
        return self.assistant_prefix.rstrip().endswith("<think>")


TEMPLATES = {
    t.name: t
    for t in (
        PromptTemplate("r1_zero", R1_ZERO_SYSTEM, "", use_chat_template=False,
                       shortest_answer="<think> </think> <answer> 0 </answer>"),
        PromptTemplate(
            "chat_think",
            None,
            "Think step by step inside <think> </think> tags, then give the final answer within \\boxed{}.",
            use_chat_template=True,
            assistant_prefix="<think>\n",
            shortest_answer="</think> \\boxed{0}",
        ),
        PromptTemplate(
            "chat_boxed",
            None,
            "Please reason step by step, and put your final answer within \\boxed{}.",
            use_chat_template=True,
        ),
        PromptTemplate(
            "direct",
            None,
            "Answer with the final number only.",
            use_chat_template=True,
            extraction="any",
            shortest_answer="0",
        ),
        PromptTemplate(
            "code",
            None,
            "Write the complete Python function in one ```python code block.",
            use_chat_template=True,
            shortest_answer="```python\ndef f(): pass\n```",
        ),
        PromptTemplate("bare", None, "", use_chat_template=False, extraction="any", shortest_answer="0", bare=True),
    )
}


def get_template(name: str) -> PromptTemplate:
    """The preset ``name``. Raises ConfigError listing the presets."""
    if name not in TEMPLATES:
        raise ConfigError(f"unknown template {name!r}; templates: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def render_prompt(example: Example, tokenizer, template: PromptTemplate) -> str:
    """The full text the policy continues for ``example``.

    Args:
        example: the problem (``example.prompt``).
        tokenizer: a transformers tokenizer (needed for chat templates only).
        template: the template.

    Raises:
        ConfigError: a chat template is requested but the tokenizer has none.
    """
    problem = example.prompt.strip()
    if template.bare:
        return problem
    if not template.use_chat_template:
        system = f"{template.system_prompt} " if template.system_prompt else ""
        prefix = f" {template.assistant_prefix}" if template.assistant_prefix else ""
        return f"{system}User: {user_text(example, template)}. Assistant:{prefix}"
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(
            f"template {template.name!r} needs a chat template, but the tokenizer has none; "
            "use template r1_zero"
        )
    text = tokenizer.apply_chat_template(chat_messages(example, template), tokenize=False,
                                         add_generation_prompt=True)
    if template.assistant_prefix.strip() and text.rstrip().endswith(template.assistant_prefix.strip()):
        return text  # the chat template opens the turn with it already (DeepSeek-R1's writes "<think>\n")
    return text + template.assistant_prefix


def user_text(example: Example, template: PromptTemplate) -> str:
    """The user turn: the problem, then the template's instruction after a blank line."""
    problem = example.prompt.strip()
    return f"{problem}\n\n{template.instruction}" if template.instruction else problem


def chat_messages(example: Example, template: PromptTemplate) -> list[dict[str, str]]:
    """The OpenAI-style messages of ``example`` (the system prompt when the template sets one, then the
    user turn): what ``render_prompt`` passes to the chat template, and what an OpenAI-compatible
    endpoint receives. The ``assistant_prefix`` is not a message (a chat endpoint cannot prefill it)."""
    messages = [{"role": "user", "content": user_text(example, template)}]
    if template.system_prompt is not None:
        messages.insert(0, {"role": "system", "content": template.system_prompt})
    return messages


def encode_prompt(text: str, tokenizer) -> list[int]:
    """Token ids of a rendered prompt with exactly the BOS the model expects: the tokenizer's special
    tokens are added only when ``text`` does not already start with its BOS token."""
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]
