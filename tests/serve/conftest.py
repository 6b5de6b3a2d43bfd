"""Serving fixtures (the scripted model is described in serve_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_helpers import scripted_llama


@pytest.fixture(scope="session")
def scripted_run_dir(tmp_path_factory, embedded_dir) -> Path:
    """An r1kit run directory whose ``final/`` holds the scripted model (what ``r1kit serve RUN`` serves)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    run = tmp_path_factory.mktemp("scripted_run")
    scripted_llama(tok).save_pretrained(run / "final", safe_serialization=True)
    tok.save_pretrained(run / "final")
    return run


@pytest.fixture(scope="session")
def scripted_model_dir(scripted_run_dir) -> Path:
    """The scripted model's HF directory."""
    return scripted_run_dir / "final"
