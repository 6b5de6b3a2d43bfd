"""Atomic writes, the one place for them: every artifact r1kit writes (reports, manifests, checkpoints,
model directories, GGUF files) is written to a hidden temporary sibling and renamed into place, so a
reader never sees a half-written artifact and a failure or a kill while writing keeps the previous one.

``atomic_file`` and ``atomic_dir`` hand the caller the temporary path to write; ``write_atomic`` is the
text-file case. Before the rename every file and directory of the artifact gets the mode a plain
``open``/``mkdir`` gives (0o666 / 0o777 less the umask: 0o644 / 0o755 under the usual 0o022), never the
owner-only 0o600/0o700 of ``tempfile`` or of a library's own temporary (transformers' safetensors
writer leaves ``model.safetensors`` 0o600), so a server or container running as another user reads it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from r1kit.errors import ConfigError


def apply_umask(path: Path) -> Path:
    """Give ``path`` and, for a directory, everything below it the mode a plain ``open``/``mkdir``
    would (0o666 / 0o777 less the umask; a file with an execute bit keeps 0o777 less the umask).
    ``tempfile.mkdtemp``/``mkstemp`` and libraries' own temporaries create 0o700 / 0o600, and an
    artifact renamed from them would be unreadable to a server or container running as another user.
    Symbolic links are left alone."""
    umask = os.umask(0)
    os.umask(umask)
    path = Path(path)
    for p in [path, *(path.rglob("*") if path.is_dir() and not path.is_symlink() else ())]:
        if not p.is_symlink():
            executable = p.is_dir() or p.stat().st_mode & 0o111
            os.chmod(p, (0o777 if executable else 0o666) & ~umask)
    return path


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of the file ``path`` (``.<name>.<pid>.tmp``, hidden, a name a resuming
    sampler sweeps) for the caller to create; when the block ends without error it is renamed over
    ``path``. On an error it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to the file ``path`` through ``atomic_file``. Returns ``path``."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a fresh empty temporary sibling directory of ``out_dir`` (``.<name>.tmp*``) for the caller
    to fill; when the block ends without error it replaces ``out_dir``. A previous ``out_dir`` is first
    renamed aside (``.<name>.old*``) and removed only once the new one is in place, so no moment leaves
    neither. On an error the temporary directory is removed and the previous ``out_dir`` is untouched."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp", dir=out_dir.parent))
    try:
        yield tmp
        apply_umask(tmp)
        if out_dir.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old", dir=out_dir.parent))
            os.replace(out_dir, aside)  # onto an empty directory: allowed by rename(2)
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                os.replace(aside, out_dir)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable(path: str | Path, kind: str, flag: str = "--output") -> Path:
    """Raise ConfigError naming ``flag`` and the OS reason when the directory ``path`` (``kind`` "dir")
    or the directory of the file ``path`` (``kind`` "file") cannot be created or written: its missing
    directories are made, a probe file is written there and removed, and the directories made are
    removed again (except under torchrun, whose ranks share the path), so the filesystem is left as it was. Call before any work (a path under /proc, a
    read-only mount, a directory without write permission is refused before a model loads, not when the
    first artifact is written)."""
    path = Path(path)
    target = path if kind == "dir" else path.parent
    for attempt in range(3):  # the ranks of one torchrun check the same path: another may remove its dirs meanwhile
        made = []
        try:
            for d in reversed([p for p in (target, *target.parents) if not p.exists()]):
                try:
                    d.mkdir()
                except FileExistsError:  # made by another process just now: not ours to remove
                    continue
                made.append(d)
            probe = target / f".r1kit-write-probe.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            return path
        except OSError as err:
            if attempt == 2:
                raise ConfigError(f"{flag} {path} cannot be written: {err.strerror or err} "
                                  f"({err.filename or target}); choose another {flag}") from None
        finally:
            # Under torchrun the ranks check the same path: a rank removing "its" directory after its
            # probe could remove it under another rank that checked it and is about to write there
            # (seen: ENOENT on the run directory), so there the directories made stay.
            for d in reversed(made if not _distributed() else []):
                try:
                    d.rmdir()
                except OSError:
                    pass
    return path


def _distributed() -> bool:
    """Whether this process is one rank of a torchrun (or other torch.distributed launcher) job."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
