"""SFT readers and rendering: every layout gives the same (prompt, reasoning, answer); the trained
tokens hold the whole reasoning and the end of turn, also under a template that strips <think>; bad
rows are one DataError naming the row and field; over-long examples are dropped or refused, never cut."""

import json

import pandas as pd
import pytest
from transformers import AutoTokenizer

from r1kit.data.sft_data import SFTRow, end_of_turn_id, load_sft_rows, render_sft_example, tokenize_rows
from r1kit.data.templates import get_template
from r1kit.errors import DataError

PROMPT = "What is 2 + 3?"
REASONING = "Two plus three.\nThat is 5."
ANSWER = "The answer is \\boxed{5}."


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok(embedded_dir):
    return AutoTokenizer.from_pretrained(embedded_dir)


def test_gsm8k_worked_solutions_are_cold_start_rows():
    rows = load_sft_rows("gsm8k", "train", limit=3)
    assert rows[0].prompt.startswith("Natalia sold clips")
    assert rows[0].reasoning == ("Natalia sold 48/2 = 24 clips in May.\n"
                                 "Natalia sold 48+24 = 72 clips altogether in April and May.")
    assert rows[0].answer == "\\boxed{72}" and rows[0].id == "gsm8k/train/0"
    assert all("<<" not in r.reasoning and "####" not in r.reasoning for r in rows)


@pytest.mark.parametrize("row", [
    {"messages": [{"role": "user", "content": PROMPT},
                  {"role": "assistant", "content": f"<think>\n{REASONING}\n</think>\n\n{ANSWER}"}]},  # OpenR1-Math
    {"messages": [{"role": "user", "content": PROMPT},
                  {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING}]},
    {"system": "Your role as an assistant involves thoroughly exploring questions...",                # Bespoke-Stratos
     "conversations": [{"from": "user", "value": PROMPT},
                       {"from": "assistant", "value": f"<|begin_of_thought|>\n\n{REASONING}\n\n<|end_of_thought|>"
                                                      f"\n\n<|begin_of_solution|>\n\n{ANSWER}\n\n<|end_of_solution|>"}]},
    {"prompt": PROMPT, "completion": f"<think>{REASONING}</think>{ANSWER}"},
    {"prompt": [{"role": "user", "content": PROMPT}],
     "completion": [{"role": "assistant", "content": f"<think>\n{REASONING}\n</think>\n\n{ANSWER}"}]},
    {"id": "s/1", "prompt": PROMPT, "reasoning": REASONING, "answer": ANSWER, "completion": "raw", "gold": "5"},
])
def test_every_layout_reads_the_same_row(tmp_path, row):
    (r,) = load_sft_rows(str(_jsonl(tmp_path / "d.jsonl", [row])))
    assert (r.prompt, r.reasoning, r.answer) == (PROMPT, REASONING, ANSWER)


def test_sampler_directory_and_parquet(tmp_path):
    shards = tmp_path / "out" / "shards"
    shards.mkdir(parents=True)
    base = {"prompt": PROMPT, "answer": ANSWER, "completion": "x", "gold": "5", "verdict": "correct"}
    _jsonl(shards / "00001.jsonl", [{**base, "id": "b", "reasoning": None}])
    _jsonl(shards / "00000.jsonl", [{**base, "id": "a", "reasoning": REASONING}])
    rows = load_sft_rows(str(tmp_path / "out"))
    assert [(r.id, r.reasoning) for r in rows] == [("a", REASONING), ("b", None)]
    messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": f"<think>{REASONING}</think>{ANSWER}"}]
    pd.DataFrame([{"problem": PROMPT, "messages": messages}]).to_parquet(tmp_path / "d.parquet")
    (r,) = load_sft_rows(str(tmp_path / "d.parquet"))
    assert (r.prompt, r.reasoning, r.answer) == (PROMPT, REASONING, ANSWER)


@pytest.mark.parametrize("row, needle", [
    ({"messages": [{"role": "user", "content": PROMPT}]}, "row 1: field 'messages' has no assistant turn"),
    ({"messages": [{"role": "user", "content": PROMPT, "reasoning_content": "hm"},
                   {"role": "assistant", "content": ANSWER}]},
     "row 1: messages[0] is a user message with a 'reasoning_content' field"),
    ({"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "<think>never closed"}]},
     "row 1: messages[1]: the reasoning opens <think> but never closes it"),
    ({"question": PROMPT}, "row 1: no SFT layout fits its fields ['question']"),
])
def test_bad_rows_are_one_error_naming_row_and_field(tmp_path, row, needle):
    with pytest.raises(DataError) as err:
        load_sft_rows(str(_jsonl(tmp_path / "bad.jsonl", [row])))
    assert needle in str(err.value) and "bad.jsonl" in str(err.value)


@pytest.mark.parametrize("template", ["chat_think", "chat_boxed", "r1_zero"])
def test_trained_tokens_hold_the_whole_reasoning_and_the_end_of_turn(tok, template):
    """The assistant turn (prefill + trained tokens) is the same text for every template: <think>, the
    whole reasoning, </think>, the answer, and SmolLM2's end of turn <|im_end|> (its EOS) trained last."""
    prompt_ids, completion_ids = render_sft_example(PROMPT, REASONING, ANSWER, tok, template)
    assert completion_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    prefill = "<think>\n" if template == "chat_think" else ""
    assert tok.decode(prompt_ids).endswith(prefill)
    assert prefill + tok.decode(completion_ids) == f"<think>\n{REASONING}\n</think>\n\n{ANSWER}<|im_end|>"
    _, no_reasoning = render_sft_example(PROMPT, None, ANSWER, tok, template)
    assert tok.decode(no_reasoning) == (f"\n</think>\n\n{ANSWER}<|im_end|>" if prefill else f"{ANSWER}<|im_end|>")


def test_r1_style_template_that_strips_think_still_trains_on_the_reasoning(embedded_dir):
    """DeepSeek-R1's chat template keeps only the text after </think> of an assistant turn and opens
    <think> in the generation prompt; r1kit never renders the trained turn through it."""
    tok = AutoTokenizer.from_pretrained(embedded_dir)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}<|User|>{{ m['content'] }}"
        "{% elif m['role'] == 'assistant' %}{% set c = m['content'] %}{% if '</think>' in c %}"
        "{% set c = c.split('</think>')[-1] %}{% endif %}<|Assistant|>{{ c }}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}")
    stock = tok.apply_chat_template([{"role": "user", "content": PROMPT},
                                     {"role": "assistant", "content": f"<think>\n{REASONING}\n</think>\n\n{ANSWER}"}],
                                    tokenize=False)
    assert REASONING not in stock                       # the trap: the stock template drops the reasoning
    for template in ("chat_boxed", "chat_think"):               # chat_think's prefill is not written twice
        prompt_ids, completion_ids = render_sft_example(PROMPT, REASONING, ANSWER, tok, template)
        assert tok.decode(prompt_ids).endswith("<|Assistant|><think>\n")
        assert tok.decode(prompt_ids).count("<think>\n") == 1
        assert tok.decode(completion_ids) == f"{REASONING}\n</think>\n\n{ANSWER}<|im_end|>"   # no second <think>
    assert end_of_turn_id(tok, get_template("chat_boxed")) == tok.eos_token_id


def test_over_long_examples_are_dropped_or_refused_never_cut(tok):
    short = SFTRow(PROMPT, REASONING, ANSWER, "short")
    long = SFTRow(PROMPT, "step. " * 300, ANSWER, "long")
    n_short = sum(map(len, render_sft_example(PROMPT, REASONING, ANSWER, tok, "chat_think")))
    kept, dropped = tokenize_rows([short, long], tok, "chat_think", max_length=n_short)
    assert [e.id for e in kept] == ["short"] and dropped == ["long"] and len(kept[0]) == n_short
    assert kept[0].completion_ids[-1] == tok.eos_token_id
    with pytest.raises(DataError, match=r"example long has \d+ tokens .* > max_length=\d+; raise --max-length"):
        tokenize_rows([short, long], tok, "chat_think", max_length=n_short, overlong="error")


def test_render_completion_is_the_one_think_wrapping_sft_and_the_sampler_share():
    """The sampler rebuilt an endpoint's reasoning_content + content by hand; it now calls this. A null
    content (the reasoning never ended) leaves the think block open, as split_reasoning expects."""
    from r1kit.data.reasoning import ReasoningSplit, split_reasoning
    from r1kit.data.sft_data import render_completion

    assert render_completion("3 + 4 = 7", "\\boxed{7}", False) == "<think>\n3 + 4 = 7\n</think>\n\n\\boxed{7}"
    assert render_completion("3 + 4 = 7", "\\boxed{7}", True) == "3 + 4 = 7\n</think>\n\n\\boxed{7}"
    assert render_completion(None, "\\boxed{7}", False) == "\\boxed{7}"
    assert render_completion("", "\\boxed{7}", False) == "<think>\n\n</think>\n\n\\boxed{7}"
    cut = render_completion("3 + 4 is", None, False)
    assert cut == "<think>\n3 + 4 is" and split_reasoning(cut, False) == ReasoningSplit("3 + 4 is", None)
