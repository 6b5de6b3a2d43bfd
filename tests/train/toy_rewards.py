"""Reward functions for trainer tests: they give random-weight tiny models reward variance."""


def distinct_chars(completions, examples):
    """Number of distinct characters / 10: varies between completions of a random model."""
    return [len(set(c)) / 10.0 for c in completions]
