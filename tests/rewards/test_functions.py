"""build_reward_functions: built-ins, weights, user rewards by import path, and their errors."""

import textwrap

import pytest

from r1kit.data.base import Example
from r1kit.errors import ConfigError
from r1kit.rewards.format import FormatReward
from r1kit.rewards.functions import build_reward_functions
from r1kit.rewards.math import AccuracyReward, MathVerifier

USER_MODULE = textwrap.dedent(
    """
    def char_count(completions, examples):
        return [len(c) for c in completions]

    class GoldLength:
        name = "gold_length"

        def __call__(self, completions, examples):
            return [float(len(e.gold)) for e in examples]

    def make_constant():
        return lambda completions, examples: [0.25] * len(completions)

    NOT_CALLABLE = 5

    def one_argument(completions):
        return [0.0] * len(completions)

    def wrong_length(completions, examples):
        return [1.0]

    def not_finite(completions, examples):
        return [float("nan")] * len(completions)
    """
)

COMPLETIONS = ["<think>x</think><answer>12</answer>", "\\boxed{3}"]
EXAMPLES = [Example("t/0", "p", "12"), Example("t/1", "p", "30")]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def test_builtins_and_default_weights():
    verifier = MathVerifier()
    pairs = build_reward_functions(["accuracy", "format"], None, verifier, think_in_prompt=True)
    (accuracy, w_acc), (fmt, w_fmt) = pairs
    assert isinstance(accuracy, AccuracyReward) and accuracy.verifier is verifier
    assert isinstance(fmt, FormatReward) and fmt.think_in_prompt is True
    assert (w_acc, w_fmt) == (1.0, 1.0)
    assert accuracy(COMPLETIONS, EXAMPLES) == [1.0, 0.0]


def test_user_rewards_by_import_path(user_module):
    names = [f"{user_module}:char_count", f"{user_module}:GoldLength", f"{user_module}:make_constant"]
    pairs = build_reward_functions(["accuracy", *names], [1.0, 0.5, 2.0, -1.0], MathVerifier())
    assert [f.name for f, _ in pairs] == ["accuracy", "char_count", "gold_length", "make_constant"]
    assert [w for _, w in pairs] == [1.0, 0.5, 2.0, -1.0]
    assert pairs[1][0](COMPLETIONS, EXAMPLES) == [35.0, 9.0]
    assert pairs[2][0](COMPLETIONS, EXAMPLES) == [2.0, 2.0]
    assert pairs[3][0](COMPLETIONS, EXAMPLES) == [0.25, 0.25]


@pytest.mark.parametrize(
    "name,message",
    [
        ("bleu", "neither a built-in"),
        ("no_such_module_xyz:fn", "cannot be imported"),
        ("{mod}:missing", "cannot be imported"),
        ("{mod}:NOT_CALLABLE", "is not a callable"),
        ("{mod}:one_argument", "is not a callable"),
    ],
)
def test_bad_reward_paths(user_module, name, message):
    name = name.format(mod=user_module)
    with pytest.raises(ConfigError, match=message) as err:
        build_reward_functions([name], None, MathVerifier())
    assert repr(name) in str(err.value)


def test_user_reward_output_checked(user_module):
    (wrong, _), (nan, _) = build_reward_functions(
        [f"{user_module}:wrong_length", f"{user_module}:not_finite"], None, MathVerifier()
    )
    with pytest.raises(ConfigError, match="reward 'wrong_length' has 1 values for 2 completions"):
        wrong(COMPLETIONS, EXAMPLES)
    with pytest.raises(ConfigError, match="reward 'not_finite' has a non-finite value"):
        nan(COMPLETIONS, EXAMPLES)


@pytest.mark.parametrize(
    "names,weights,message",
    [
        (["accuracy", "format"], [1.0], r"reward_weights has 1 values for 2 reward_funcs \['accuracy', 'format'\]"),
        (["accuracy"], [float("inf")], "reward_weights has a non-finite value"),
        ([], None, "is empty"),
        (["accuracy", "accuracy"], None, "must be unique"),
    ],
)
def test_bad_weights_and_names(names, weights, message):
    with pytest.raises(ConfigError, match=message):
        build_reward_functions(names, weights, MathVerifier())
