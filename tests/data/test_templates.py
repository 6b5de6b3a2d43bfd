"""Prompt templates rendered with the embedded model's tokenizer (SmolLM2 chat template)."""

import dataclasses

import pytest
from transformers import AutoTokenizer

from r1kit.data.base import Example
from r1kit.data.templates import R1_ZERO_SYSTEM, TEMPLATES, encode_prompt, get_template, render_prompt
from r1kit.errors import ConfigError
from r1kit.models.embedded import embedded_model_dir

EXAMPLE = Example("t/0", "What is 2 + 3?", "5")
SMOL_DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(embedded_model_dir())


def test_r1_zero_is_the_spec_text(tokenizer):
    text = render_prompt(EXAMPLE, tokenizer, get_template("r1_zero"))
    assert text == (
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
        "The assistant first thinks about the reasoning process in the mind and then provides the user with "
        "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
        "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
        "</answer>. User: What is 2 + 3?. Assistant:"
    )
    assert text.startswith(R1_ZERO_SYSTEM)
    assert not get_template("r1_zero").think_in_prompt


def test_r1_zero_with_think_prefix(tokenizer):
    template = dataclasses.replace(get_template("r1_zero"), assistant_prefix="<think>\n")
    assert render_prompt(EXAMPLE, None, template).endswith("User: What is 2 + 3?. Assistant: <think>\n")
    assert template.think_in_prompt


def test_chat_think(tokenizer):
    template = get_template("chat_think")
    text = render_prompt(EXAMPLE, tokenizer, template)
    assert text == (
        SMOL_DEFAULT_SYSTEM + "<|im_start|>user\nWhat is 2 + 3?\n\n"
        "Think step by step inside <think> </think> tags, then give the final answer within \\boxed{}."
        "<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
    assert template.think_in_prompt


def test_chat_boxed_and_direct(tokenizer):
    boxed = render_prompt(EXAMPLE, tokenizer, get_template("chat_boxed"))
    assert boxed.endswith(
        "What is 2 + 3?\n\nPlease reason step by step, and put your final answer within \\boxed{}."
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    direct = get_template("direct")
    assert render_prompt(EXAMPLE, tokenizer, direct).endswith(
        "What is 2 + 3?\n\nAnswer with the final number only.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (direct.extraction, get_template("chat_boxed").extraction) == ("any", "tagged")


def test_explicit_system_prompt_replaces_default(tokenizer):
    template = dataclasses.replace(get_template("chat_boxed"), system_prompt="Be brief.")
    text = render_prompt(EXAMPLE, tokenizer, template)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert "SmolLM" not in text


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_single_bos(tokenizer, name):
    text = render_prompt(EXAMPLE, tokenizer, get_template(name))
    ids = encode_prompt(text, tokenizer)
    # SmolLM2's BOS is <|im_start|>: chat prompts open with exactly one, the plain prompt with none.
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert (ids[0] == tokenizer.bos_token_id) is TEMPLATES[name].use_chat_template
    assert ids[1] != tokenizer.bos_token_id
    assert tokenizer.decode(ids) == text


class BosAddingTokenizer:
    """A tokenizer that prepends BOS (id 0) when asked for special tokens, like Llama-3's."""

    bos_token = "<s>"
    chat_template = "unused"

    def __call__(self, text, add_special_tokens=True):
        body = [ord(c) for c in text.removeprefix(self.bos_token)]
        starts = [0] if text.startswith(self.bos_token) else []
        return {"input_ids": ([0] if add_special_tokens else []) + starts + body}


def test_encode_prompt_never_doubles_bos():
    tok = BosAddingTokenizer()
    assert encode_prompt("<s>hi", tok) == [0, ord("h"), ord("i")]
    assert encode_prompt("hi", tok) == [0, ord("h"), ord("i")]


def test_errors():
    with pytest.raises(ConfigError, match="unknown template 'r1'; templates: r1_zero, chat_think, chat_boxed, direct"):
        get_template("r1")

    class NoChat:
        chat_template = None

    with pytest.raises(ConfigError, match="template 'chat_boxed' needs a chat template"):
        render_prompt(EXAMPLE, NoChat(), get_template("chat_boxed"))
