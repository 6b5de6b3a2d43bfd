"""Artifacts written through temporary files get the mode a plain mkdir/open would give (the umask),
not tempfile's owner-only 0o700/0o600: a server or container running as another user reads them."""

import os

from r1kit.io import atomic_dir


def test_atomic_directory_has_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "final") as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")
        out = tmp_path / "final"
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
