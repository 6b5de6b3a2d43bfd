"""Pipeline configs (``r1kit pipeline r1``, ``r1kit distill``): the shared fields, stage sections,
presets, YAML files and ``--field`` flags, resolved like ``r1kit/config.py``.

Resolution order (later wins): dataclass defaults → preset → YAML file → ``--field value`` flags.
A *stage section* is a dict field (``cold_start: {preset: cold_start, learning_rate: 5e-5}``) holding
that stage's own config fields (SFTConfig, GRPOConfig, SampleConfig) and optionally ``preset``; a YAML
section updates the preset's section key by key, so a file can change one field of one stage.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass
from typing import Any

from r1kit.errors import ConfigError
from r1kit.rollout.base import check_sampling


@dataclass
class PipelineFields:
    """The fields every pipeline has: rendering, seeds, the output, and the held-out evaluation."""

    template: str = "chat_boxed"  # prompt template of every stage and of the evaluation (r1kit.data.templates)
    answer_extraction: str = "tagged"  # MathVerifier extraction for rewards, sampling and evaluation
    seed: int = 0  # seed of every stage
    num_threads: int | None = None  # torch intra-op threads (None = torch default)
    output: str = "runs/pipeline"  # pipeline directory: one subdirectory per stage, report.md, report.png
    eval_task: str | None = None  # held-out task (default: task), never trained on
    eval_split: str = "test"  # its split
    eval_limit: int | None = 200  # the first N problems of eval_split: a fixed subset (None = all)
    eval_k: int = 1  # samples per held-out problem (pass@1 = their mean)
    eval_temperature: float = 0.6  # R1 evaluation protocol
    eval_top_p: float = 0.95  # R1 evaluation protocol
    eval_max_tokens: int = 256  # completion tokens at most in evaluation
    eval_stop: list[str] = dataclasses.field(default_factory=list)  # strings that end an evaluation completion

    def validate(self) -> None:
        """Raise ConfigError naming the field for an invalid value."""
        for name in ("eval_k", "eval_max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ConfigError(f"eval_limit must be >= 1 (or none), got {self.eval_limit}")
        check_sampling(self.eval_temperature, self.eval_top_p, names=("eval_temperature", "eval_top_p", ""))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def eval_settings(self, task: str):
        """The EvalSettings of this pipeline (held-out ``eval_task``, default ``task``)."""
        from r1kit.pipeline.stages import EvalSettings

        return EvalSettings(task=self.eval_task or task, split=self.eval_split, limit=self.eval_limit, k=self.eval_k,
                            temperature=self.eval_temperature, top_p=self.eval_top_p, max_tokens=self.eval_max_tokens,
                            template=self.template, answer_extraction=self.answer_extraction, seed=self.seed,
                            stop=list(self.eval_stop))


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def sections(cls: type) -> list[str]:
    """The stage sections of a pipeline config class: its dict fields."""
    return [name for name, tp in field_types(cls).items() if tp is dict]


def apply_pipeline_overrides(cfg, values: dict[str, Any], source: str):
    """Apply ``values`` to a pipeline config; a stage section updates the current one key by key.

    Raises:
        ConfigError: an unknown field or stage section (names ``source``, the stages and the fields).
    """
    from r1kit.config import _coerce, stop_strings

    types, secs = field_types(type(cfg)), sections(type(cfg))
    for key, value in values.items():
        name = key.replace("-", "_")
        if name in secs:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: stage section {name} must be a mapping of config fields, got {value!r}")
            setattr(cfg, name, {**getattr(cfg, name), **value})
        elif name in types:
            setattr(cfg, name, _coerce(stop_strings(name, value), types[name], name))
        else:
            plain = [n for n in types if n not in secs]
            raise ConfigError(f"{source}: {key!r} is neither a pipeline stage ({', '.join(secs)}) "
                              f"nor a pipeline field ({', '.join(plain)})")
    return cfg


def load_pipeline_config(cls: type, presets: dict[str, dict[str, Any]], preset: str | None = None,
                         yaml_path: str | None = None, overrides: dict[str, Any] | None = None):
    """defaults → preset → YAML → overrides, validated.

    Raises:
        ConfigError: unknown preset, missing file or bad YAML, unknown stage or field, invalid value.
    """
    from r1kit.config import read_yaml_mapping

    cfg = cls()
    if preset:
        if preset not in presets:
            raise ConfigError(f"unknown pipeline preset {preset!r}; presets: {', '.join(sorted(presets))}")
        apply_pipeline_overrides(cfg, presets[preset], f"preset {preset}")
    if yaml_path:
        apply_pipeline_overrides(cfg, read_yaml_mapping(yaml_path, "pipeline config file"), yaml_path)
    if overrides:
        apply_pipeline_overrides(cfg, overrides, "command line")
    cfg.validate()
    return cfg


def _comments(cls: type) -> dict[str, str]:
    pattern = re.compile(r"^\s+(\w+): [^=]+=.*?#\s*(.+)$")
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        out.update({m.group(1): m.group(2) for m in map(pattern.match, inspect.getsource(klass).splitlines()) if m})
    return out


def add_pipeline_arguments(parser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One ``--field-name`` option per plain field of ``cls`` (stage sections: --config only)."""
    comments = _comments(cls)
    secs = sections(cls)
    for f in dataclasses.fields(cls):
        if f.name not in secs and f.name not in skip:
            parser.add_argument("--" + f.name.replace("_", "-"), dest="pl_" + f.name, default=None, metavar="V",
                                help=comments.get(f.name, ""))


def pipeline_overrides_from_args(args) -> dict[str, Any]:
    return {k[3:]: v for k, v in vars(args).items() if k.startswith("pl_") and v is not None}
