"""Policies: load_policy (HF dir, GGUF, embedded alias) and the DeepSeek-V3 model."""
