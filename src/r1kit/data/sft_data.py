"""SFT data: rows of (prompt, reasoning, answer) from every layout r1kit reads, and their one rendering.

Readers (``load_sft_rows``), each row becoming an ``SFTRow``:
  * chat rows: ``messages`` (``role``/``content``) or ``conversations`` (``from``/``value``, the
    Bespoke-Stratos / OpenThoughts layout, with its ``<|begin_of_thought|>…<|end_of_solution|>``
    markers), the reasoning inside ``<think>…</think>`` in the assistant content (OpenR1-Math) or in a
    ``reasoning_content`` field of the assistant message; the last assistant turn is the completion and
    the one user turn before it the prompt (a system turn is kept in ``meta``: r1kit renders the prompt
    with its own template, the same at training, sampling and evaluation);
  * prompt/completion rows (``prompt``, ``completion``; strings or message lists);
  * prompt/reasoning/answer rows, as r1kit's sampler writes them (a directory with ``shards/*.jsonl``,
    or one file);
  * registered tasks with worked solutions (``gsm8k``, ``gsm8k_easy``): the solution before ``####``
    with its ``<<…>>`` calculator annotations removed is the reasoning, ``\\boxed{gold}`` the answer;
  * local ``.jsonl``/``.json``/``.parquet`` files of any layout above, and Hugging Face dataset names
    (``owner/name``) when a hub is reachable.

Rendering (``render_sft_example``): the prompt through ``render_prompt``/``encode_prompt`` exactly as
sampling, GRPO and evaluation render it; the completion as ``render_completion`` writes it, followed
by the chat template's end-of-turn token (``end_of_turn_id``; the EOS for plain templates), so the
trained tokens hold the whole reasoning and the token that stops generation. The tokenizer's chat
template is never applied to the assistant turn: R1's strips ``<think>…</think>`` from it
(DeepSeek-R1 #633, open-r1 #515; DISTILL_SPEC §5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1kit.data.base import Example
from r1kit.data.reasoning import THINK_CLOSE, THINK_OPEN, split_reasoning
from r1kit.data.rows import FILE_SUFFIXES, jsonl_rows, read_rows
from r1kit.data.templates import PromptTemplate, encode_prompt, get_template, render_prompt
from r1kit.errors import DataError

#: Tasks whose examples carry a GSM8K-style worked solution in ``meta["solution"]``.
SOLUTION_TASKS = ("gsm8k", "gsm8k_easy")
#: Bespoke-Stratos / OpenThoughts markers around the reasoning and the solution.
THOUGHT_MARKERS = ("<|begin_of_thought|>", "<|end_of_thought|>", "<|begin_of_solution|>", "<|end_of_solution|>")
REASONING_KEYS = ("reasoning_content", "reasoning")
_CALCULATOR = re.compile(r"<<[^>]*>>")


@dataclass(frozen=True)
class SFTRow:
    """One training example before rendering.

    Attributes:
        prompt: the problem / user turn, unrendered.
        reasoning: the chain of thought (without tags); None when the row has none.
        answer: the text after the reasoning (the summary with the final answer).
        id: unique within the data set (``"<source>/<row>"`` unless the row has an ``id``).
        meta: the source file and row, a system turn, the gold answer where known.
    """

    prompt: str
    reasoning: str | None
    answer: str
    id: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


# ----- readers -----
def load_sft_rows(spec: str, split: str = "train", limit: int | None = None) -> list[SFTRow]:
    """The SFT rows of ``spec``: a sampler output directory, a local file, a registered task with worked
    solutions, or a Hugging Face dataset name (module docstring).

    Raises:
        DataError: missing file/field, a file of another format (.md, .csv: names the accepted
            extensions), a row of no known layout, a chat row with no assistant turn, a
            reasoning field on a non-assistant message, a task without worked solutions, no hub; the
            message names the file, row and field.
    """
    from r1kit.data.base import task_names
    from r1kit.data.loading import _hub_rows, load_task

    path = Path(spec).expanduser()
    if path.is_dir():
        shards = sorted((path / "shards").glob("*.jsonl"))
        if not shards:
            raise DataError(f"{path} is a directory without shards/*.jsonl; pass a sampler output directory "
                            "or a .jsonl/.parquet file")
        rows = [row_to_sft(r, shard, n) for shard in shards for n, r in jsonl_rows(shard)]
    elif spec.endswith(FILE_SUFFIXES):
        rows = [row_to_sft(r, path, n) for n, r in read_rows(path)]
    elif path.is_file():
        raise DataError(f"SFT data {spec}: {f'a {path.suffix} file' if path.suffix else 'a file without an extension'} "
                        f"is not a format r1kit reads; pass a {', '.join(FILE_SUFFIXES)} file, a sampler output "
                        f"directory, a task ({', '.join(SOLUTION_TASKS)}) or a hub dataset name (owner/name)")
    elif spec in task_names():
        if spec not in SOLUTION_TASKS:
            raise DataError(f"task {spec!r} has no worked solutions to train on; SFT tasks: "
                            f"{', '.join(SOLUTION_TASKS)}; or pass a file or a sampler output directory")
        rows = [solution_row(e) for e in load_task(spec, split)]
    elif "/" in spec:
        rows = [row_to_sft(r, spec, n) for n, r in _hub_rows(spec, split)]
    else:
        raise DataError(f"SFT data {spec!r} is not a file, a directory, a task ({', '.join(SOLUTION_TASKS)}) "
                        "or a hub dataset name (owner/name)")
    seen: set[str] = set()
    for row in rows:
        if row.id in seen:
            raise DataError(f"{row.meta.get('source', spec)} row {row.meta.get('row')}: id {row.id!r} repeats an "
                            "earlier row; ids must be unique")
        seen.add(row.id)
    return rows[:limit] if limit else rows


def solution_row(example: Example) -> SFTRow:
    """A GSM8K problem as cold-start data: reasoning = the worked solution before ``####`` without its
    ``<<…>>`` calculator annotations; answer = ``\\boxed{gold}``."""
    solution = example.meta["solution"]
    reasoning = _CALCULATOR.sub("", solution.rsplit("####", 1)[0]).strip()
    return SFTRow(example.prompt.strip(), reasoning, f"\\boxed{{{example.gold}}}", example.id,
                  {"gold": example.gold})


def row_to_sft(row: dict[str, Any], source: str | Path, row_no: int) -> SFTRow:
    """One row of a file, shard or hub dataset in any layout of the module docstring.

    Raises DataError naming ``source``, the row and the field."""
    where = f"{source} row {row_no}"
    row_id = str(row["id"]) if row.get("id") is not None else f"{Path(str(source)).stem}/{row_no}"
    meta = {"source": str(source), "row": row_no, **({"gold": row["gold"]} if row.get("gold") is not None else {})}
    if "messages" in row or "conversations" in row:
        key = "messages" if "messages" in row else "conversations"
        messages = _messages(row[key], where, key)
        if isinstance(row.get("system"), str):
            messages.insert(0, {"role": "system", "content": row["system"]})
        return _from_chat(messages, where, key, row_id, meta)
    if "prompt" in row and "answer" in row and "reasoning" in row:       # r1kit's sampler
        return SFTRow(_text(row, "prompt", where), _optional_text(row, "reasoning", where),
                      _text(row, "answer", where), row_id, meta)
    if "prompt" in row and "completion" in row:
        prompt = row["prompt"]
        completion = row["completion"]
        messages = (_messages(prompt, where, "prompt") if isinstance(prompt, list)
                    else [{"role": "user", "content": _text(row, "prompt", where)}])
        messages += (_messages(completion, where, "completion") if isinstance(completion, list)
                     else [{"role": "assistant", "content": _text(row, "completion", where)}])
        return _from_chat(messages, where, "completion", row_id, meta)
    raise DataError(f"{where}: no SFT layout fits its fields {sorted(row)}; expected messages, conversations, "
                    "prompt+completion or prompt+reasoning+answer")


def _text(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {key!r} must be a non-empty string, got {type(value).__name__}")
    return value.strip()


def _optional_text(row: dict[str, Any], key: str, where: str) -> str | None:
    value = row.get(key)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string or null, got {type(value).__name__}")
    return value.strip() if value is not None else None


def _messages(value: Any, where: str, key: str) -> list[dict[str, Any]]:
    """``value`` as a list of {role, content, ...} dicts (``from``/``value`` renamed; ``human``/``gpt``
    are user/assistant). Raises DataError naming the field and message index."""
    if hasattr(value, "tolist"):                                       # a Parquet array
        value = value.tolist()
    if not isinstance(value, list):
        raise DataError(f"{where}: field {key!r} must be a list of messages, got {type(value).__name__}")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise DataError(f"{where}: {key}[{i}] must be an object with a role and content")
        role = msg.get("role", msg.get("from"))
        role = {"human": "user", "gpt": "assistant"}.get(role, role)
        content = msg.get("content", msg.get("value"))
        if role not in ("system", "user", "assistant", "tool"):
            raise DataError(f"{where}: {key}[{i}] has role {role!r}; expected system, user or assistant")
        if not isinstance(content, str):
            raise DataError(f"{where}: {key}[{i}] ({role}) has no text content")
        reasoning = {k: msg[k] for k in REASONING_KEYS if msg.get(k) is not None}
        if reasoning and role != "assistant":
            name = next(iter(reasoning))
            raise DataError(f"{where}: {key}[{i}] is a {role} message with a {name!r} field; reasoning belongs "
                            "to assistant messages only: move it or drop the field")
        out.append({"role": role, "content": content, **reasoning})
    return out


def _from_chat(messages: list[dict[str, Any]], where: str, key: str, row_id: str, meta: dict) -> SFTRow:
    """The last assistant turn as (reasoning, answer), the user turn before it as the prompt."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError(f"{where}: field {key!r} has no assistant turn to train on (roles: "
                        f"{[m['role'] for m in messages]}); add the assistant's answer or drop the row")
    users = [m for m in messages[:last] if m["role"] == "user"]
    if len(users) != 1:
        raise DataError(f"{where}: field {key!r} has {len(users)} user turns before the assistant turn; SFT "
                        "takes single-turn rows (one user turn, then the assistant)")
    system = next((m["content"] for m in messages[:last] if m["role"] == "system"), None)
    reasoning, answer = assistant_parts(messages[last], f"{where}: {key}[{last}]")
    return SFTRow(users[0]["content"].strip(), reasoning, answer, row_id,
                  {**meta, **({"system": system} if system else {})})


def assistant_parts(message: dict[str, Any], where: str) -> tuple[str | None, str]:
    """(reasoning, answer) of an assistant message: its ``reasoning_content`` field, the Bespoke-Stratos
    thought/solution markers, or ``<think>…</think>`` in the content (``split_reasoning``).

    Raises DataError when the reasoning never closes or the answer is empty."""
    content = message["content"]
    given = next((message[k] for k in REASONING_KEYS if message.get(k) is not None), None)
    if given is not None:
        if THINK_CLOSE in content:
            raise DataError(f"{where}: reasoning given twice (a reasoning_content field and </think> in the "
                            "content); keep one")
        reasoning, answer = str(given).strip(), content.strip()
    elif THOUGHT_MARKERS[1] in content:
        head, _, tail = content.partition(THOUGHT_MARKERS[1])
        reasoning = head.replace(THOUGHT_MARKERS[0], "").strip()
        answer = tail.replace(THOUGHT_MARKERS[2], "").replace(THOUGHT_MARKERS[3], "").strip()
    else:
        split = split_reasoning(content)
        if split.content is None:
            raise DataError(f"{where}: the reasoning opens <think> but never closes it (no </think>); the row "
                            "has no answer to train on")
        reasoning, answer = split.reasoning, split.content
    if not answer:
        raise DataError(f"{where}: the assistant turn has no answer after its reasoning")
    return reasoning, answer


# ----- rendering -----
def render_completion(reasoning: str | None, answer: str | None, think_in_prompt: bool) -> str:
    """The assistant text after the rendered prompt (end-of-turn token not included).

    A prompt that ends in an open ``<think>`` (``chat_think``'s prefill, or a chat template that writes
    it, as DeepSeek-R1's does): ``reasoning + "\\n</think>\\n\\n" + answer``; otherwise
    ``"<think>\\n" + reasoning + "\\n</think>\\n\\n" + answer`` when there is reasoning, the answer
    alone when not. ``answer`` None: the reasoning never ended (an endpoint's null content after its
    ``reasoning_content``), so no ``</think>`` is written after it."""
    if reasoning is None and not think_in_prompt:
        return answer or ""
    opening = "" if think_in_prompt else f"{THINK_OPEN}\n"
    if answer is None:
        return f"{opening}{reasoning or ''}"
    return f"{opening}{reasoning or ''}\n{THINK_CLOSE}\n\n{answer}"


def end_of_turn_id(tokenizer, template: PromptTemplate) -> int:
    """The token that ends the assistant turn: for chat templates, the first special token the
    tokenizer's chat template writes after an assistant message's content (``<|im_end|>`` for
    SmolLM2/Qwen, ``<|eot_id|>`` for Llama 3), else the EOS.

    Raises DataError when the tokenizer has neither."""
    if template.use_chat_template and getattr(tokenizer, "chat_template", None):
        sentinel = "r1kit-sentinel-7"
        text = tokenizer.apply_chat_template([{"role": "user", "content": "q"},
                                              {"role": "assistant", "content": sentinel}], tokenize=False)
        if sentinel in text:
            after = tokenizer(text.rsplit(sentinel, 1)[1], add_special_tokens=False)["input_ids"]
            special = set(tokenizer.all_special_ids)
            found = next((t for t in after if t in special), None)
            if found is not None:
                return found
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token and its chat template no end-of-turn token: the model "
                        "could never learn to stop; set tokenizer.eos_token")
    return tokenizer.eos_token_id


def render_sft_example(prompt: str, reasoning: str | None, answer: str, tokenizer,
                       template: PromptTemplate | str) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids) of one example: the prompt as sampling and evaluation encode it, the
    completion as ``render_completion`` writes it, ending with ``end_of_turn_id`` (module docstring)."""
    template = get_template(template) if isinstance(template, str) else template
    text = render_prompt(Example("sft", prompt, None), tokenizer, template)
    prompt_ids = encode_prompt(text, tokenizer)
    think_in_prompt = text.rstrip().endswith(THINK_OPEN)
    completion = tokenizer(render_completion(reasoning, answer, think_in_prompt), add_special_tokens=False)["input_ids"]
    return prompt_ids, completion + [end_of_turn_id(tokenizer, template)]


@dataclass(frozen=True)
class TokenizedExample:
    """A rendered example: ``prompt_ids`` (no loss) then ``completion_ids`` (trained, end of turn last)."""

    id: str
    prompt_ids: list[int]
    completion_ids: list[int]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def tokenize_rows(rows: list[SFTRow], tokenizer, template: PromptTemplate | str, max_length: int,
                  overlong: str = "drop") -> tuple[list[TokenizedExample], list[str]]:
    """Render every row; an example longer than ``max_length`` tokens is never cut: dropped (its id
    returned in the second list) or, with ``overlong="error"``, a DataError naming the row.

    Returns (examples, dropped ids)."""
    kept, dropped = [], []
    for row in rows:
        prompt_ids, completion_ids = render_sft_example(row.prompt, row.reasoning, row.answer, tokenizer, template)
        n = len(prompt_ids) + len(completion_ids)
        if n > max_length:
            if overlong == "error":
                raise DataError(f"example {row.id} has {n} tokens ({len(prompt_ids)} prompt + {len(completion_ids)} "
                                f"completion) > max_length={max_length}; raise --max-length, or pass --overlong drop "
                                "to drop such examples (never cut)")
            dropped.append(row.id)
            continue
        kept.append(TokenizedExample(row.id, prompt_ids, completion_ids))
    return kept, dropped
