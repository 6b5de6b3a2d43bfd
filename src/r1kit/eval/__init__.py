"""Evaluation: pass@1 over k samples, maj@k (cons@k), reports."""
