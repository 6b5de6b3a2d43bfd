"""Rejection sampling (``r1kit sample``): a teacher samples N completions per prompt, the task's verifier
keeps the correct ones, readability filters, deduplication and decontamination drop the rest
(DeepSeek-R1 v1 §2.3.3, v2 App. B.3.2-B.3.3; DISTILL_SPEC §2 and §4).

Teacher: any model ``load_policy`` loads, sampled through ``runtime.make_engine`` (the engine RL and
evaluation use) with the run's template (``runtime.make_render``); or an OpenAI-compatible endpoint
(``teacher_url``), asked through the ``openai`` client's chat API with the template's messages.

Each sample meets these checks in order; the first that fails drops it and names the drop (its count
in ``manifest.json``, the sample in ``dropped/``):

  ``verifier``            the task's verifier (``runtime.make_verifier``, the object reward and eval use)
                          says the answer is wrong;
  ``unclosed_reasoning``  the reasoning never closed (``split_reasoning`` gives no answer to train on);
  ``language``            language consistency of the CoT (``rewards.language``) below
                          ``min_language_consistency``;
  ``repetition``          share of repeated word ``repetition_ngram``-grams of the CoT above
                          ``max_repetition`` (1 − distinct/total; a loop of one sentence scores ~0.9);
  ``long_paragraph``      a paragraph of the CoT (split at blank lines) longer than
                          ``max_paragraph_words`` white-space words;
  ``code_block``          a fenced code block in the reasoning (only a tagged reasoning: a plain
                          answer to a code task is code);
  ``decontam``            the completion shares a 10-gram with an evaluation question + solution
                          (``data.decontam``; questions are checked before sampling, see below);
  ``duplicate``           same normalized text as a sample kept before it for the same prompt;
  ``near_duplicate``      Jaccard similarity of word ``shingle_size``-gram sets at or above
                          ``near_duplicate_threshold`` with a sample kept before it for the same prompt
                          (exact Jaccard: a prompt has only N samples, so no MinHash is needed);
  ``max_per_prompt``      ``max_per_prompt`` samples of the prompt are kept already.

The CoT is the reasoning, or the whole completion when it has no reasoning tags
(``rewards.language.reasoning_text``). The default thresholds sit above every one of the 7,973
reference solutions of GSM8K train and MATH-500 (repetition of 10-grams at most 0.29, paragraphs at
most 335 words), so human-written worked solutions pass. Prompts whose question matches an evaluation
split (8-gram of the question, or 10-gram of question + solution) are dropped before any sampling,
listed in ``dropped/decontaminated_prompts.jsonl``.

Output directory (``run_sample``):

  plan.json                 resolved config, teacher weights sha256, the prompt ids of every shard
  shards/shard-XXXXX.jsonl  kept rows (schema: ``sample_row``), one file per shard of prompts; written
                            last, so a shard is done exactly when this file exists
  dropped/shard-XXXXX.jsonl dropped samples, each with ``dropped_by`` and ``detail``
  index/shard-XXXXX.json    the prompt-level index of a shard: per prompt, samples drawn, kept, dropped
                            per check
  manifest.json             counts per check and totals, summed over the done shards; ``complete``

Every file is written to a temporary name and renamed, so a run killed at any moment (SIGKILL) leaves
only whole files; a rerun (``resume``) redoes the shards without a kept-rows file and skips the others:
no sample is lost or written twice. Seeds: shard k is sampled with ``shard_seed(seed, k)`` (an
endpoint request j of shard k with ``shard_seed(seed, k) + j``), so a resumed run writes exactly what an
uninterrupted one would; the plan fixes the shards, and a rerun with settings that change the
output is an error once a shard has written anything (a run that failed before that, such as one
whose teacher URL refused, is started afresh with the new settings).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from r1kit.data.base import Example
from r1kit.data.decontam import MAX_EXAMPLES, QUESTION_NGRAM, SOLUTION_NGRAM, normalized_words, ngrams
from r1kit.data.reasoning import split_reasoning
from r1kit.errors import ConfigError, R1kitError
from r1kit.eval.evaluate import write_atomic as _write_atomic  # a module global: tests patch it
from r1kit.models.loading import check_output_path
from r1kit.rewards.language import (DEFAULT_LANGUAGES, LanguageReward, language_code, language_consistency,
                                    reasoning_text)
from r1kit.rollout.base import SamplingParams

CHECKS = ("verifier", "unclosed_reasoning", "language", "repetition", "long_paragraph", "code_block", "decontam",
          "duplicate", "near_duplicate", "max_per_prompt")
# Fields that do not change what a run writes: a resumed run may change them.
_RUNTIME_FIELDS = ("output", "request_timeout", "max_retries", "max_concurrency", "api_key_env", "num_threads")
_FENCE = re.compile(r"^\s*```", re.MULTILINE)
_PARAGRAPH = re.compile(r"\n\s*\n")


@dataclass
class SampleConfig:
    """Every knob of a rejection-sampling run (``r1kit sample``)."""

    # --- teacher ---
    teacher: str = "smollm2-135m-instruct"  # load_policy name/path; with teacher_url: the model name sent to the endpoint
    teacher_url: str | None = None  # OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (None = sample locally)
    teacher_api: str = "chat"  # endpoint API: chat (the server's chat template) | completions (r1kit renders the prompt)
    teacher_tokenizer: str | None = None  # completions API: load_policy name/path whose tokenizer renders the template
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the endpoint's key (unset: "EMPTY")
    request_timeout: float = 120.0  # seconds an endpoint request may take before it is an error
    max_retries: int = 2  # endpoint retries (openai client, with backoff) before an error
    max_concurrency: int = 8  # endpoint requests in flight at once
    backend: str = "auto"  # local sampling engine: auto | engine | hf | vllm (runtime.make_engine)
    dtype: str = "auto"  # local sampling dtype: auto (bf16 where the CPU has native bf16) | bf16 | fp32

    # --- data ---
    task: str = "svamp"  # registered task or local .jsonl/.parquet (its verifier checks the answers)
    split: str = "train"  # never an evaluation split (decontamination would drop every prompt)
    prompt_field: str | None = None  # local files: field holding the problem
    answer_field: str | None = None  # local files: field holding the gold answer
    limit: int | None = None  # first N problems of the split (None = all)
    template: str = "chat_think"  # prompt template (r1kit.data.templates); chat_think prefills "<think>\n"
    answer_extraction: str | None = None  # math verifier: tagged | any (None = the template's own)

    # --- sampling ---
    num_samples: int = 4  # N completions per prompt (R1 v2 B.3.2: "several" per prompt)
    max_tokens: int = 1024  # completion tokens at most
    temperature: float = 1.0  # R1 v2 B.3.2 samples cold-start data at T = 1.0
    top_p: float = 1.0  # nucleus mass
    top_k: int = 0  # 0 = off
    stop: list[str] = field(default_factory=list)  # strings that end a completion
    seed: int = 0  # base seed; shard k uses shard_seed(seed, k)
    prompts_per_shard: int = 16  # prompts per shard file (the unit of resume)
    num_threads: int | None = None  # torch intra-op threads (None = torch default)

    # --- filters (each switchable) ---
    filter_language: bool = True  # drop CoT mixing languages (R1 v2 B.3.2)
    min_language_consistency: float = 0.95  # share of CoT words in the question's language required
    languages: list[str] = field(default_factory=lambda: list(DEFAULT_LANGUAGES))  # detector set (ISO 639-1)
    filter_repetition: bool = True  # drop repetitive CoT
    repetition_ngram: int = 10  # words per n-gram of the repetition ratio
    max_repetition: float = 0.3  # 1 - distinct/total n-grams allowed (GSM8K/MATH-500 solutions: max 0.29)
    filter_long_paragraphs: bool = True  # drop CoT with a wall of text
    max_paragraph_words: int = 400  # words per paragraph allowed (GSM8K/MATH-500 solutions: max 335)
    filter_code_blocks: bool = True  # drop reasoning holding a fenced code block
    dedup: bool = True  # drop exact and near duplicates among a prompt's samples
    near_duplicate_threshold: float = 0.8  # Jaccard of word shingles at/above which a later sample is dropped
    shingle_size: int = 5  # words per shingle of the near-duplicate check
    decontaminate: bool = True  # n-gram decontamination against every shipped evaluation split
    decontam_question_ngram: int = QUESTION_NGRAM  # question rule (open-r1: 8)
    decontam_solution_ngram: int = SOLUTION_NGRAM  # question + solution rule (DeepSeek: 10)
    decontam_max_examples: int = MAX_EXAMPLES  # n-grams in more eval examples than this are boilerplate, not matched
    max_per_prompt: int | None = None  # keep at most this many samples per prompt (None = every survivor)

    # --- output ---
    output: str = "runs/sample"  # run directory

    def validate(self) -> None:
        """Raise ConfigError naming the field for an invalid value."""
        for name in ("num_samples", "max_tokens", "prompts_per_shard", "repetition_ngram", "max_paragraph_words",
                     "shingle_size", "decontam_question_ngram", "decontam_solution_ngram", "decontam_max_examples",
                     "max_concurrency"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("limit", "max_per_prompt", "num_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 or none, got {getattr(self, name)}")
        for name in ("min_language_consistency", "max_repetition"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.near_duplicate_threshold <= 0:
            raise ConfigError(f"near_duplicate_threshold must be > 0 (above 1 turns it off), got "
                              f"{self.near_duplicate_threshold}")
        if self.request_timeout <= 0 or self.max_retries < 0:
            raise ConfigError("request_timeout must be > 0 and max_retries >= 0")
        if self.answer_extraction not in (None, "tagged", "any"):
            raise ConfigError(f"answer_extraction must be tagged, any or none, got {self.answer_extraction!r}")
        if self.teacher_url is not None and not re.match(r"^https?://", self.teacher_url):
            raise ConfigError(f"teacher_url must be an http(s) URL such as http://127.0.0.1:8000/v1, "
                              f"got {self.teacher_url!r}")
        if self.teacher_api not in ("chat", "completions"):
            raise ConfigError(f"teacher_api must be chat or completions, got {self.teacher_api!r}")
        if self.teacher_api == "completions" and self.teacher_url and not self.teacher_tokenizer:
            raise ConfigError("teacher_api completions renders prompts locally: give teacher_tokenizer (a model "
                              "name or directory whose tokenizer has the teacher's chat template)")
        self.sampling_params(0).validate()
        for code in self.languages:
            language_code(code)

    def sampling_params(self, seed: int) -> SamplingParams:
        """The engine's SamplingParams for one shard."""
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, n=self.num_samples, seed=seed, stop=list(self.stop))

    def sampling_record(self) -> dict[str, Any]:
        """The sampling settings written with every sample (provenance)."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "max_tokens": self.max_tokens, "n": self.num_samples, "stop": list(self.stop),
                "template": self.template}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # R1 v2 B.3.2: several trajectories per prompt at T = 1.0, verified, readable.
    "r1_cold_start": dict(num_samples=4, temperature=1.0, top_p=1.0, max_tokens=32768, template="chat_think"),
    # R1 stage 3 (v1 §2.3.3): several samples per prompt from the RL checkpoint at R1's recommended
    # sampling settings (T 0.6, top-p 0.95, as in evaluation), only the correct ones kept.
    "r1_rejection": dict(num_samples=4, temperature=0.6, top_p=0.95, max_tokens=32768, template="chat_think"),
    # Sized for 2 CPU cores and the 135M embedded model: SVAMP train, one-line answers.
    "cpu_demo": dict(task="svamp", split="train", template="direct", answer_extraction="any", stop=["\n"],
                     num_samples=4, temperature=0.8, top_p=1.0, max_tokens=48, prompts_per_shard=32),
}


def sample_config(preset: str | None = None, **overrides: Any) -> SampleConfig:
    """A validated SampleConfig: defaults → ``preset`` → ``overrides``. Raises ConfigError for an unknown
    preset or field, or an invalid value."""
    cfg = SampleConfig()
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown sample preset {preset!r}; presets: {', '.join(sorted(PRESETS))}")
        overrides = {**PRESETS[preset], **overrides}
    names = {f.name for f in dataclasses.fields(SampleConfig)}
    for key, value in overrides.items():
        if key not in names:
            raise ConfigError(f"unknown sample config field {key!r}")
        setattr(cfg, key, value)
    cfg.validate()
    return cfg


def shard_seed(seed: int, shard: int) -> int:
    """The sampling seed of shard ``shard``: the first 31 bits of sha256(f"{seed}:{shard}")."""
    return int(hashlib.sha256(f"{seed}:{shard}".encode()).hexdigest()[:8], 16) >> 1


def state_sha256(model) -> str:
    """sha256 over the model's state dict: every tensor's name, dtype, shape and bytes, names sorted."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Drawn:
    """One sampled completion: its text, ``finish_reason`` (``"stop"``/``"length"``) and seed."""

    text: str
    finish_reason: str
    seed: int


class EngineTeacher:
    """A local teacher: ``load_policy`` → ``runtime.make_engine``, prompts rendered with ``make_render``."""

    def __init__(self, cfg: SampleConfig):
        import torch

        from r1kit.models.loading import load_policy, resolve_dtype
        from r1kit.runtime import make_engine, make_render

        model, self.tokenizer = load_policy(cfg.teacher, dtype=torch.float32)
        self.render, self.template = make_render(cfg.template, self.tokenizer)
        dtype = resolve_dtype(cfg.dtype)
        self.engine = make_engine(model, self.tokenizer, cfg.backend, dtype)
        self.name = cfg.teacher
        self.weights_sha256 = state_sha256(model)
        self.think_in_prompt = self.template.think_in_prompt

    def sample(self, examples: Sequence[Example], cfg: SampleConfig, seed: int) -> list[list[Drawn]]:
        """``cfg.num_samples`` completions per example, from one seeded ``generate`` call."""
        from r1kit.data.templates import encode_prompt

        n = cfg.num_samples
        comps = self.engine.generate([encode_prompt(self.render(e), self.tokenizer) for e in examples],
                                     cfg.sampling_params(seed))
        texts = self.tokenizer.batch_decode([c.token_ids for c in comps], skip_special_tokens=True)
        return [[Drawn(texts[i * n + j], comps[i * n + j].finish_reason, seed) for j in range(n)]
                for i in range(len(examples))]


class EndpointTeacher:
    """A teacher behind an OpenAI-compatible endpoint, one request per sample (``n=1``, so servers
    without ``n`` work). ``teacher_api="chat"``: the template's messages (``templates.chat_messages``),
    rendered by the server (no assistant prefill). ``"completions"``: the prompt rendered here by
    ``runtime.make_render`` with ``teacher_tokenizer``'s chat template, exactly as for a local teacher
    (``chat_think``'s ``<think>\\n`` prefill included).

    A ``reasoning_content`` (DeepSeek API, SGLang, r1kit's server) or ``reasoning`` (vLLM) field in the
    answer is put back as ``<think>\\n…\\n</think>\\n\\n`` before the content (no closing tag when the
    content is null: the reasoning never ended), so ``split_reasoning`` treats both layouts alike.
    Raises R1kitError when the endpoint refuses, times out or answers an HTTP error."""

    def __init__(self, cfg: SampleConfig):
        import openai

        from r1kit.data.templates import get_template

        self.url = cfg.teacher_url
        self.timeout = cfg.request_timeout
        self.retries = cfg.max_retries
        self.client = openai.OpenAI(base_url=cfg.teacher_url, api_key=os.environ.get(cfg.api_key_env) or "EMPTY",
                                    timeout=cfg.request_timeout, max_retries=cfg.max_retries)
        self.template = get_template(cfg.template)
        self.name = cfg.teacher
        self.weights_sha256 = None
        self.think_in_prompt = False
        self.render = None
        if cfg.teacher_api == "completions":
            from transformers import AutoTokenizer

            from r1kit.models.loading import resolve_model_dir
            from r1kit.runtime import make_render

            source = resolve_model_dir(cfg.teacher_tokenizer)
            self.render, _ = make_render(cfg.template, AutoTokenizer.from_pretrained(source))
            self.think_in_prompt = self.template.think_in_prompt

    def _request(self, example: Example, cfg: SampleConfig, seed: int) -> Drawn:
        import openai

        from r1kit.data.templates import chat_messages

        settings = dict(model=cfg.teacher, n=1, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                        top_p=cfg.top_p, seed=seed, stop=list(cfg.stop) or None,
                        extra_body={"top_k": cfg.top_k} if cfg.top_k else None)
        try:
            if self.render is not None:
                reply = self.client.completions.create(prompt=self.render(example), **settings)
            else:
                reply = self.client.chat.completions.create(messages=chat_messages(example, self.template), **settings)
        except openai.APITimeoutError:
            raise R1kitError(f"teacher endpoint {self.url} did not answer within {self.timeout:g} s "
                             f"({self.retries} retries); raise --request-timeout or check the server") from None
        except openai.APIConnectionError as err:
            raise R1kitError(f"teacher endpoint {self.url} refused the connection or cannot be reached "
                             f"({err.__cause__ or err}); start the server or fix --teacher-url") from None
        except openai.APIStatusError as err:
            raise R1kitError(f"teacher endpoint {self.url} answered HTTP {err.status_code} ({err.message}); "
                             "check --teacher (the model name the server serves) and the server log") from None
        if not reply.choices:
            raise R1kitError(f"teacher endpoint {self.url} answered with no choices for {example.id}")
        choice = reply.choices[0]
        if self.render is not None:
            return Drawn(choice.text or "", choice.finish_reason or "stop", seed)
        reasoning = next((v for v in (_message_field(choice.message, k) for k in ("reasoning_content", "reasoning"))
                          if v is not None), None)
        text = choice.message.content
        if reasoning is not None:  # no content after a reasoning (None): it never closed
            from r1kit.data.sft_data import render_completion

            text = render_completion(reasoning, text, think_in_prompt=False)  # the chat API prefills nothing
        return Drawn(text or "", choice.finish_reason or "stop", seed)

    def sample(self, examples: Sequence[Example], cfg: SampleConfig, seed: int) -> list[list[Drawn]]:
        """``cfg.num_samples`` completions per example; request j of the shard uses ``seed + j``."""
        from concurrent.futures import ThreadPoolExecutor

        n = cfg.num_samples
        jobs = [(e, seed + i * n + j) for i, e in enumerate(examples) for j in range(n)]
        with ThreadPoolExecutor(max_workers=cfg.max_concurrency) as pool:
            drawn = list(pool.map(lambda job: self._request(job[0], cfg, job[1]), jobs))
        return [drawn[i * n:(i + 1) * n] for i in range(len(examples))]


def _message_field(message, key: str):
    """``message.<key>``, declared by the openai client or not (then it is in ``model_extra``)."""
    value = getattr(message, key, None)
    return (message.model_extra or {}).get(key) if value is None else value


def make_teacher(cfg: SampleConfig):
    """The endpoint teacher when ``cfg.teacher_url`` is set, else the local engine teacher."""
    return EndpointTeacher(cfg) if cfg.teacher_url else EngineTeacher(cfg)


def repetition_ratio(text: str, n: int) -> float:
    """1 − distinct/total word n-grams of ``text`` (normalized words); 0.0 with fewer than n words."""
    grams = list(ngrams(normalized_words(text), n))
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def longest_paragraph(text: str) -> int:
    """White-space words of the longest paragraph of ``text`` (paragraphs split at blank lines)."""
    return max((len(p.split()) for p in _PARAGRAPH.split(text)), default=0)


def shingles(text: str, size: int) -> frozenset:
    """Word ``size``-gram shingles of the normalized text (the whole text as one for shorter ones)."""
    words = normalized_words(text)
    return frozenset(ngrams(words, size)) if len(words) >= size else frozenset([tuple(words)])


def jaccard(a: frozenset, b: frozenset) -> float:
    """|a ∩ b| / |a ∪ b| (1.0 for two empty sets)."""
    return len(a & b) / len(a | b) if a or b else 1.0


class Judge:
    """The checks of the module docstring, applied to one prompt's samples at a time.

    Args:
        cfg: the run config (switches and thresholds).
        decontaminator: a ``data.decontam.Decontaminator``, or None when decontamination is off.
        think_in_prompt: the teacher's prompt opens ``<think>``.
    """

    def __init__(self, cfg: SampleConfig, decontaminator, think_in_prompt: bool):
        self.cfg, self.decontaminator = cfg, decontaminator
        self.think_in_prompt = think_in_prompt
        self.language = LanguageReward(think_in_prompt, languages=cfg.languages) if cfg.filter_language else None

    def judge_prompt(self, example: Example, drawn: Sequence[Drawn], verdicts) -> list[tuple[dict, str | None, Any]]:
        """(quality record, the failed check or None, its detail) per sample of one prompt, in order;
        ``verdicts`` are the verifier's, one per sample."""
        out = []
        kept: list[tuple[int, tuple, frozenset]] = []  # (sample index, normalized words, shingles) kept
        for j, (d, verdict) in enumerate(zip(drawn, verdicts)):
            quality: dict[str, Any] = {}
            failed = self._first_failure(example, d, verdict, quality)
            words, sh = tuple(normalized_words(d.text)), shingles(d.text, self.cfg.shingle_size)
            if failed is None and self.cfg.dedup:
                failed = self._duplicate(words, sh, kept)
            if failed is None and self.cfg.max_per_prompt is not None and len(kept) >= self.cfg.max_per_prompt:
                failed = ("max_per_prompt", f"{self.cfg.max_per_prompt} samples of this prompt already kept")
            if failed is None:
                kept.append((j, words, sh))
            out.append((quality, *(failed or (None, None))))
        return out

    def _first_failure(self, example: Example, d: Drawn, verdict, quality: dict) -> tuple[str, Any] | None:
        cfg = self.cfg
        if not verdict.correct:
            return "verifier", verdict.reason
        split = split_reasoning(d.text, self.think_in_prompt)
        if split.content is None:
            return "unclosed_reasoning", "no </think> before the end of the completion"
        cot = reasoning_text(d.text, self.think_in_prompt)
        if self.language is not None:
            target = self.language.target(example)
            quality["language"] = score = language_consistency(cot, target, cfg.languages)
            quality["target_language"] = target
            if score < cfg.min_language_consistency:
                return "language", f"{score:.3f} of the CoT's words in {target} < {cfg.min_language_consistency}"
        if cfg.filter_repetition:
            quality["repetition"] = ratio = repetition_ratio(cot, cfg.repetition_ngram)
            if ratio > cfg.max_repetition:
                return "repetition", f"{ratio:.3f} of word {cfg.repetition_ngram}-grams repeat > {cfg.max_repetition}"
        if cfg.filter_long_paragraphs:
            quality["longest_paragraph"] = words = longest_paragraph(cot)
            if words > cfg.max_paragraph_words:
                return "long_paragraph", f"a paragraph of {words} words > {cfg.max_paragraph_words}"
        if cfg.filter_code_blocks and split.reasoning and _FENCE.search(split.reasoning):
            return "code_block", "a ``` code block in the reasoning"
        if self.decontaminator is not None:
            match = self.decontaminator.check_text(d.text)
            if match is not None:
                return "decontam", match.to_dict()
        return None

    def _duplicate(self, words: tuple, sh: frozenset, kept: list[tuple[int, tuple, frozenset]]
                   ) -> tuple[str, str] | None:
        for index, other_words, other_sh in kept:
            if words == other_words:
                return "duplicate", f"same normalized text as kept sample {index} of this prompt"
            similarity = jaccard(sh, other_sh)
            if similarity >= self.cfg.near_duplicate_threshold:
                return "near_duplicate", f"Jaccard {similarity:.3f} with kept sample {index} of this prompt"
        return None


def sample_row(example: Example, index: int, d: Drawn, verdict, teacher, cfg: SampleConfig,
               quality: dict) -> dict[str, Any]:
    """One output row: ``id`` (``"<prompt id>#<sample index>"``), ``prompt_id``, ``sample_index``,
    ``prompt`` (the problem, unrendered), ``reasoning`` (str | None), ``answer`` (the content after the
    reasoning), ``completion`` (raw text), ``gold``, ``verdict`` (correct, score, reason, extracted),
    ``finish_reason``, provenance (``teacher``, ``teacher_url``, ``weights_sha256``, ``seed``,
    ``sampling``), ``task``, ``split``, ``think_in_prompt`` and the filter scores (``quality``)."""
    split = split_reasoning(d.text, teacher.think_in_prompt)
    return {"id": f"{example.id}#{index}", "prompt_id": example.id, "sample_index": index, "prompt": example.prompt,
            "reasoning": split.reasoning, "answer": split.content, "completion": d.text, "gold": example.gold,
            "verdict": dataclasses.asdict(verdict), "finish_reason": d.finish_reason, "teacher": teacher.name,
            "teacher_url": cfg.teacher_url, "weights_sha256": teacher.weights_sha256, "seed": d.seed,
            "sampling": cfg.sampling_record(), "task": cfg.task, "split": cfg.split,
            "think_in_prompt": teacher.think_in_prompt, "quality": quality}


def _jsonl(rows: Sequence[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def _fingerprint(cfg: SampleConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k not in _RUNTIME_FIELDS}


def _plan(cfg: SampleConfig, out: Path, resume: bool):
    """Load and decontaminate the prompts, cut them into shards, and write ``plan.json`` (or check it
    against an existing one). Returns (the plan, the examples by id).

    Raises ConfigError: ``out`` holds something else, or a started run with other settings; R1kitError: every
    prompt is contaminated, or the task has none."""
    from r1kit.data.loading import load_task
    from r1kit.runs import check_run_kind

    check_run_kind(out, "sample")
    plan_path = out / "plan.json"
    # A run that failed before its first shard (a teacher URL that refuses) holds only its plan: nothing
    # sampled would be lost, so a rerun starts afresh with its own settings.
    started = plan_path.is_file() and _sampled_anything(out)
    if started and not resume:
        raise ConfigError(f"{out} already holds a sample run; resume it or choose another --output")
    if not plan_path.is_file() and out.exists() and any(out.iterdir()):
        raise ConfigError(f"--output {out} exists and is not a sample run directory; choose an empty or new one")
    examples = load_task(cfg.task, cfg.split, prompt_field=cfg.prompt_field, answer_field=cfg.answer_field,
                         limit=cfg.limit)
    if not examples:
        raise R1kitError(f"task {cfg.task!r} split {cfg.split!r} has no problems to sample")
    clean, contaminated = list(examples), []
    if cfg.decontaminate:
        decon = _decontaminator(cfg)
        matches = [(e, decon.check_question(e.prompt)) for e in examples]
        clean = [e for e, m in matches if m is None]
        contaminated = [{"prompt_id": e.id, "prompt": e.prompt, "dropped_by": "decontam", "detail": m.to_dict()}
                        for e, m in matches if m is not None]
        if not clean:
            raise R1kitError(f"all {len(examples)} prompts of {cfg.task!r} split {cfg.split!r} overlap an evaluation "
                             f"split (first: {contaminated[0]['prompt_id']} ~ {contaminated[0]['detail']['eval_id']}); "
                             "sample a training split, or set decontaminate false")
    ids = [e.id for e in clean]
    plan = {"version": 1, "config": _fingerprint(cfg),
            "shards": [ids[i:i + cfg.prompts_per_shard] for i in range(0, len(ids), cfg.prompts_per_shard)],
            "num_prompts": len(examples), "prompts_decontaminated": len(contaminated), "teacher_weights_sha256": None}
    if started:
        old = json.loads(plan_path.read_text())
        changed = sorted(k for k in set(old["config"]) | set(plan["config"])
                         if old["config"].get(k) != plan["config"].get(k))
        if changed or old["shards"] != plan["shards"]:
            what = f"settings {', '.join(changed)}" if changed else "the prompts of the task"
            raise ConfigError(f"{out} holds a sample run whose {what} differ from this one; resume it with the "
                              "same settings or choose another --output")
        plan["teacher_weights_sha256"] = old.get("teacher_weights_sha256")
    else:
        _write_atomic(out / "dropped" / "decontaminated_prompts.jsonl", _jsonl(contaminated))
        _write_atomic(plan_path, json.dumps(plan, indent=1))
    return plan, {e.id: e for e in clean}


def _sampled_anything(out: Path) -> bool:
    """Whether any shard of the run in ``out`` wrote a file (dropped rows, index or kept rows)."""
    return any(next((out / folder).glob("shard-*"), None) is not None for folder in ("shards", "index", "dropped"))


def _summarize(cfg: SampleConfig, out: Path, plan: dict, teacher_name: str) -> dict[str, Any]:
    """The manifest, summed over the shards that are done; written atomically."""
    counts = dict.fromkeys(("sampled", *CHECKS, "kept"), 0)
    done = 0
    for k in range(len(plan["shards"])):
        if _shard_done(out, k):
            done += 1
            index = json.loads((out / "index" / f"{_shard_name(k)}.json").read_text())
            for key, value in index["counts"].items():
                counts[key] += value
    manifest = {"complete": done == len(plan["shards"]), "shards_done": done, "shards_total": len(plan["shards"]),
                "teacher": teacher_name, "teacher_url": cfg.teacher_url,
                "weights_sha256": plan["teacher_weights_sha256"], "task": cfg.task, "split": cfg.split,
                "num_prompts": plan["num_prompts"], "prompts_decontaminated": plan["prompts_decontaminated"],
                "prompts_sampled": sum(len(s) for s in plan["shards"]), "counts": counts,
                "decontamination": _decontam_record(cfg), "config": cfg.to_dict()}
    _write_atomic(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


def _decontaminator(cfg: SampleConfig):
    """The shipped-splits Decontaminator with the run's settings (built once per process)."""
    from r1kit.data.decontam import shipped_decontaminator

    return shipped_decontaminator(cfg.decontam_question_ngram, cfg.decontam_solution_ngram, cfg.decontam_max_examples)


def _decontam_record(cfg: SampleConfig) -> dict[str, Any]:
    if not cfg.decontaminate:
        return {"enabled": False}
    decon = _decontaminator(cfg)
    return {"enabled": True, "splits": decon.splits, "question_ngram": decon.question_n,
            "solution_ngram": decon.solution_n, "max_examples": decon.max_examples}


def _check_survivors(manifest: dict[str, Any], out: Path) -> None:
    """Raise R1kitError when a complete run kept no sample (never an empty SFT input)."""
    counts = manifest["counts"]
    if not manifest["complete"] or counts["kept"] > 0:
        return
    if counts["verifier"] == counts["sampled"]:
        raise R1kitError(f"every one of the {counts['sampled']} samples failed verification (task "
                         f"{manifest['task']!r}, teacher {manifest['teacher']!r}); there is nothing to fine-tune on. "
                         f"Check the template and answer_extraction, raise max_tokens, or use a stronger teacher "
                         f"(failures listed in {out / 'dropped'})")
    dropped = ", ".join(f"{k} {v}" for k, v in counts.items() if k in CHECKS and v)
    raise R1kitError(f"no sample survived the checks ({counts['sampled']} sampled; dropped: {dropped}); there is "
                     f"nothing to fine-tune on. Loosen or switch off a filter (see {out / 'manifest.json'})")


def run_sample(cfg: SampleConfig, resume: bool = True, progress: bool = True) -> Path:
    """Run rejection sampling as the module docstring describes; returns the output directory.

    With ``resume`` an interrupted run in ``cfg.output`` continues (done shards are skipped) and a
    finished one returns at once without loading the teacher.

    Raises:
        ConfigError: invalid settings, an output directory holding something else or a run with other
            settings, a teacher whose weights changed since the run started.
        R1kitError: bad task or model, a teacher endpoint that refuses or times out, every prompt
            contaminated, or a finished run that kept no sample (the manifest is written first).
    """
    cfg.validate()
    out = check_output_path(cfg.output, "dir")
    plan, by_id = _plan(cfg, out, resume)
    for stale in out.rglob(".*.tmp"):  # left by a run killed while writing; never read
        stale.unlink()
    todo = [k for k in range(len(plan["shards"])) if not _shard_done(out, k)]
    if not todo:
        manifest = _summarize(cfg, out, plan, cfg.teacher)
        _check_survivors(manifest, out)
        return out
    if cfg.num_threads:
        import torch

        torch.set_num_threads(cfg.num_threads)
    teacher = make_teacher(cfg)
    if plan["teacher_weights_sha256"] is None:
        plan["teacher_weights_sha256"] = teacher.weights_sha256
        _write_atomic(out / "plan.json", json.dumps(plan, indent=1))
    elif plan["teacher_weights_sha256"] != teacher.weights_sha256:
        raise ConfigError(f"the weights of teacher {cfg.teacher!r} changed since this run started in {out} "
                          "(sha256 differs); resume with the same teacher or choose another --output")
    from r1kit.data.templates import get_template
    from r1kit.runtime import make_verifier

    extraction = cfg.answer_extraction or get_template(cfg.template).extraction
    verifier = make_verifier(cfg.task, extraction)
    decon = _decontaminator(cfg) if cfg.decontaminate else None
    judge = Judge(cfg, decon, teacher.think_in_prompt)
    started = time.time()
    for done, k in enumerate(todo, start=1):
        counts = _run_shard(cfg, out, k, [by_id[i] for i in plan["shards"][k]], teacher, verifier, judge)
        if progress:
            print(f"shard {k + 1}/{len(plan['shards'])}: kept {counts['kept']} of {counts['sampled']} "
                  f"({done}/{len(todo)} this run, {time.time() - started:.0f} s)", flush=True)
    manifest = _summarize(cfg, out, plan, teacher.name)
    _check_survivors(manifest, out)
    return out


def _run_shard(cfg: SampleConfig, out: Path, k: int, examples: list[Example], teacher, verifier,
               judge: Judge) -> dict[str, int]:
    """Sample, verify and judge one shard; write its dropped rows, index and kept rows (in that order,
    each atomically: a kept-rows file exists only beside its index). Returns the shard's counts."""
    seed = shard_seed(cfg.seed, k)
    drawn = teacher.sample(examples, cfg, seed)
    flat = [(e, i, d) for e, ds in zip(examples, drawn) for i, d in enumerate(ds)]
    verdicts = verifier.verify_batch([d.text for _, _, d in flat], [e for e, _, _ in flat],
                                     [d.finish_reason == "length" for _, _, d in flat])
    kept_rows, dropped_rows, prompts = [], [], []
    counts = dict.fromkeys(("sampled", *CHECKS, "kept"), 0)
    n = cfg.num_samples
    for p, example in enumerate(examples):
        entry = {"prompt_id": example.id, "sampled": n, "kept": 0, "dropped": {}}
        judged = judge.judge_prompt(example, drawn[p], verdicts[p * n:(p + 1) * n])
        for j, (quality, failed, detail) in enumerate(judged):
            row = sample_row(example, j, drawn[p][j], verdicts[p * n + j], teacher, cfg, quality)
            if failed is None:
                kept_rows.append(row)
                entry["kept"] += 1
            else:
                dropped_rows.append({**row, "dropped_by": failed, "detail": detail})
                entry["dropped"][failed] = entry["dropped"].get(failed, 0) + 1
                counts[failed] += 1
        counts["sampled"] += n
        counts["kept"] += entry["kept"]
        prompts.append(entry)
    name = _shard_name(k)
    _write_atomic(out / "dropped" / f"{name}.jsonl", _jsonl(dropped_rows))
    _write_atomic(out / "index" / f"{name}.json",
                  json.dumps({"shard": k, "seed": seed, "counts": counts, "prompts": prompts}, indent=1))
    _write_atomic(out / "shards" / f"{name}.jsonl", _jsonl(kept_rows))  # last: the shard is done
    return counts


def _shard_done(out: Path, k: int) -> bool:
    """Whether shard ``k`` is done: its kept-rows file, written after its index and dropped rows, exists."""
    return (out / "shards" / f"{_shard_name(k)}.jsonl").is_file()


def _field_comments() -> dict[str, str]:
    """The one-line comment after each SampleConfig field, used as ``--help`` text."""
    import inspect

    pattern = re.compile(r"^\s+(\w+): [^=]+=.*?#\s*(.+)$")
    return {m.group(1): m.group(2) for m in map(pattern.match, inspect.getsource(SampleConfig).splitlines()) if m}


def add_sample_arguments(parser) -> None:
    """One ``--field-name V`` option per SampleConfig field (default unset, so the preset applies)."""
    comments = _field_comments()
    defaults = SampleConfig()
    for f in dataclasses.fields(SampleConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), dest="sample_" + f.name, default=None, metavar="V",
                            help=f"{comments.get(f.name, '')} (default: {getattr(defaults, f.name)!r})")


def config_from_args(args) -> SampleConfig:
    """The SampleConfig of parsed ``r1kit sample`` arguments: preset, then the ``--field`` values read as
    the field's type (lists comma-separated; ``\\n`` in --stop is a newline). Raises ConfigError."""
    import typing

    from r1kit.config import _coerce

    hints = typing.get_type_hints(SampleConfig)
    overrides = {}
    for f in dataclasses.fields(SampleConfig):
        raw = getattr(args, "sample_" + f.name)
        if raw is None:
            continue
        if f.name == "stop":
            raw = [v.encode("latin-1", "backslashreplace").decode("unicode_escape") for v in raw.split(",") if v]
        overrides[f.name] = _coerce(raw, hints[f.name], f.name)
    return sample_config(args.preset, **overrides)
