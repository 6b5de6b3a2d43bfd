"""Serving fixtures (the scripted model is described in serve_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_helpers import scripted_llama


@pytest.fixture(scope="session")
def scripted_model_dir(tmp_path_factory, embedded_dir) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    out = tmp_path_factory.mktemp("scripted_llama")
    scripted_llama(tok).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
