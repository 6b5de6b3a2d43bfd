"""Run directories: which kind of r1kit run a directory holds, and the one check that keeps kinds apart.

Every command that writes a run directory already records what it made in a file it writes anyway;
``run_kind`` reads the kind from there (no extra marker, so runs written before this check are
recognized too):

  ====================  ==============  =====================================================
  kind (its command)    file            how the file tells
  ====================  ==============  =====================================================
  train grpo            config.yaml     its keys are ``GRPOConfig`` fields (also v3-zero's run)
  train sft             config.yaml     its keys are ``SFTConfig`` fields
  sample                plan.json       the sampler's plan (``pipeline/sample.py``)
  pipeline r1           pipeline.yaml   its keys are ``R1PipelineConfig`` fields
  distill               pipeline.yaml   its keys are ``DistillConfig`` fields
  pretrain v3-distill   pipeline.yaml   its keys are ``V3DistillConfig`` fields
  pipeline stage        manifest.json   a stage manifest (it names its ``stage``; the run is in run/)
  pipeline              */manifest.json stage directories, before the pipeline wrote pipeline.yaml
  ====================  ==============  =====================================================

``check_run_kind`` is called by each of those commands before any work: a directory that holds a
run of another kind is refused (an SFT run written into a GRPO run's directory would mix their
checkpoints, metrics and config; ``train grpo --resume`` would read the SFT config).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from r1kit.errors import ConfigError

#: kind → (what it is, in a sentence; how to continue such a run)
KINDS = {
    "train grpo": ("a GRPO training run", "continue it with `r1kit train grpo --resume --output {path}`"),
    "train sft": ("an SFT run", "continue it with `r1kit train sft --resume --output {path}`"),
    "sample": ("a rejection-sampling run", "resume it with `r1kit sample --output {path}` and its settings"),
    "pipeline r1": ("an R1 pipeline", "rerun `r1kit pipeline r1 --output {path}` with its config to continue it"),
    "distill": ("a distillation pipeline", "rerun `r1kit distill --output {path}` with its config to continue it"),
    "pretrain v3-distill": ("a v3-distill run", "rerun `r1kit pretrain v3-distill --output {path}` to continue it"),
    "pipeline stage": ("a stage of a pipeline", "rerun that pipeline to continue it"),
    "pipeline": ("a pipeline's stages", "rerun that pipeline to continue it"),
}
PIPELINE_KINDS = ("pipeline r1", "distill", "pretrain v3-distill")


def _keys(path: Path, reader) -> set[str] | None:
    """The top-level keys of the mapping in ``path`` (None when it is missing or unreadable)."""
    try:
        data = reader(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):  # unreadable, not UTF-8, not JSON/YAML: not a record of ours
        return None
    return set(data) if isinstance(data, dict) else None


def _kind_of_fields(keys: set[str] | None, classes: dict[str, type]) -> str | None:
    """The one kind whose config class has every key as a field (None when none or several do)."""
    import dataclasses

    if not keys:
        return None
    found = [kind for kind, cls in classes.items() if keys <= {f.name for f in dataclasses.fields(cls)}]
    return found[0] if len(found) == 1 else None


def _is_stage_dir(path: Path) -> bool:
    keys = _keys(path / "manifest.json", json.loads)
    return keys is not None and {"stage", "kind", "key"} <= keys


def run_kind(path: str | Path) -> tuple[str, str] | None:
    """(kind, the file that says so) of the r1kit run in ``path`` (module docstring), or None for a
    missing directory, an empty one, or one r1kit did not write."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "plan.json").is_file():
        return "sample", "plan.json"
    if (path / "config.yaml").is_file():
        from r1kit.config import GRPOConfig, SFTConfig

        kind = _kind_of_fields(_keys(path / "config.yaml", yaml.safe_load),
                               {"train grpo": GRPOConfig, "train sft": SFTConfig})
        if kind:
            return kind, "config.yaml"
    if (path / "pipeline.yaml").is_file():
        from r1kit.pipeline.distill import DistillConfig
        from r1kit.pipeline.r1 import R1PipelineConfig
        from r1kit.train.v3_distill import V3DistillConfig

        kind = _kind_of_fields(_keys(path / "pipeline.yaml", yaml.safe_load),
                               {"pipeline r1": R1PipelineConfig, "distill": DistillConfig,
                                "pretrain v3-distill": V3DistillConfig})
        if kind:
            return kind, "pipeline.yaml"
    if _is_stage_dir(path):
        return "pipeline stage", "manifest.json"
    stages = [p for p in sorted(path.iterdir()) if p.is_dir() and _is_stage_dir(p)]
    if stages:
        return "pipeline", f"{stages[0].name}/manifest.json"
    return None


def check_run_kind(path: str | Path, kind: str, flag: str = "--output") -> None:
    """Refuse ``path`` when it holds an r1kit run of another kind than ``kind`` (a ``KINDS`` key, the
    command about to write there). A pipeline's stages without its pipeline.yaml yet (a run stopped
    before it) are taken by any pipeline; the stage keys then tell a pipeline of another config.

    Raises:
        ConfigError: naming the directory, the kind it holds (and the file that says so), and the fixes:
            another ``flag``, or the command that continues that run.
    """
    found = run_kind(path)
    if found is None or found[0] == kind or (found[0] == "pipeline" and kind in PIPELINE_KINDS):
        return
    other, marker = found
    what, resume = KINDS[other]
    raise ConfigError(f"{flag} {path} holds {what} (its {marker}), not {KINDS[kind][0]}: choose another {flag} "
                      f"for this `r1kit {kind}`, or {resume.format(path=path)}")
