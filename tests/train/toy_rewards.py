"""Reward functions for trainer tests: they give random-weight tiny models reward variance."""


def distinct_chars(completions, examples):
    """Number of distinct characters / 10: varies between completions of a random model."""
    return [len(set(c)) / 10.0 for c in completions]


def raises_on_three(completions, examples):
    """distinct_chars, but raises ValueError on the problem "What is 3 plus 4?" (a failing reward)."""
    if any(e.prompt.startswith("What is 3 plus") for e in examples):
        raise ValueError("three")
    return distinct_chars(completions, examples)
