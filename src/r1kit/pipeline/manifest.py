"""Stage manifests: what a pipeline stage read, how it was configured, what it made (DISTILL_SPEC §1).

Every stage of a pipeline (``r1kit pipeline r1``, ``r1kit distill``) is a directory holding its
artifact (a model directory or a data directory) and ``manifest.json``:

  stage, status      the stage name; "running" from its start, "complete" once its artifact and
                     evaluation are written
  inputs             {role: {"spec": what the config named, "path": the resolved file/dir,
                     "sha256": content hash}} for the models and data it read
  config             the stage's resolved config (the trainer's or sampler's own dataclass, as a dict)
  key                sha256 of (config, inputs' hashes, the pipeline's evaluation settings): a rerun
                     skips the stage when the manifest is complete and its key matches
  artifact           the artifact's path relative to the stage directory, and its sha256
  counts, metrics    what the stage reports (examples, samples kept, steps; held-out pass@1, ...)
  cpu_seconds        ``time.process_time()`` spent in the stage (all threads of this process), summed
                     over the runs that made it (a resumed stage adds its runs); wall_seconds likewise
  started, finished  UTC timestamps

The manifest is written atomically (a temporary file renamed over the old one), so a stage killed at
any moment leaves either its previous manifest or the new one, never a torn file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from r1kit.errors import R1kitError

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def sha256_path(path: Path) -> str:
    """Content hash of a file, or of a directory: sha256 over the sorted (relative path, file sha256)
    pairs of its files. Hidden entries (temporary ``.x.tmp*`` siblings) and ``manifest.json`` are left
    out, so a directory's hash is its content and nothing else.

    Raises:
        R1kitError: ``path`` does not exist.
    """
    path = Path(path)
    if path.is_file():
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
        return h.hexdigest()
    if not path.is_dir():
        raise R1kitError(f"{path} does not exist (nothing to hash)")
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or rel.as_posix() == MANIFEST:
            continue
        h.update(f"{rel.as_posix()}\0{sha256_path(file)}\n".encode())
    return h.hexdigest()


def canonical_sha256(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys, no whitespace): the hash of a config."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def read_manifest(stage_dir: Path) -> dict | None:
    """The stage's manifest, or None when it has none.

    Raises:
        R1kitError: the manifest exists but is not valid JSON (names the file and the fix).
    """
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise R1kitError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); delete {Path(stage_dir)} "
                         "to rerun that stage") from None


def write_manifest(stage_dir: Path, manifest: dict) -> Path:
    """Write ``stage_dir/manifest.json`` atomically."""
    from r1kit.io import write_atomic

    return write_atomic(Path(stage_dir) / MANIFEST, json.dumps(manifest, indent=1, default=str))


def changed_fields(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the keys whose values differ between two nested dicts (for error messages)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(prefix + str(key))
    return out
