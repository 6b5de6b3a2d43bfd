"""Reward functions for trainer tests: they give random-weight tiny models reward variance."""


def distinct_chars(completions, examples):
    """Number of distinct characters / 10: varies between completions of a random model."""
    return [len(set(c)) / 10.0 for c in completions]


def raises_on_three(completions, examples):
    """distinct_chars, but raises ValueError on the problem "What is 3 plus 4?" (a failing reward)."""
    if any(e.prompt.startswith("What is 3 plus") for e in examples):
        raise ValueError("three")
    return distinct_chars(completions, examples)


def raises_once_on_three(completions, examples):
    """distinct_chars, but the first call on "What is 3 plus 4?" raises ValueError (a transient reward
    failure): the first caller creates ``$R1KIT_TEST_ONCE_DIR/three`` (O_EXCL, so once across processes)."""
    import os

    if any(e.prompt.startswith("What is 3 plus") for e in examples):
        try:
            os.close(os.open(os.path.join(os.environ["R1KIT_TEST_ONCE_DIR"], "three"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            pass
        else:
            raise ValueError("three, once")
    return distinct_chars(completions, examples)
