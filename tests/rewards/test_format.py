"""FormatReward: <think> reasoning </think> followed by an <answer> block or a \\boxed{} answer."""

import pytest

from r1kit.data.base import Example
from r1kit.rewards.format import FormatReward, is_well_formatted


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("<think>\n2+2=4\n</think>\n<answer>\n4\n</answer>", True),
        ("  <think>2+2</think> <answer>4</answer>  ", True),
        ("<think>2+2</think> So the answer is \\boxed{4}.", True),
        ("<think>2+2</think><answer>\\boxed{4}</answer>", True),
        ("<think>2+2</think><answer>4</answer> trailing text", False),
        ("<think>2+2</think><answer>4</answer><answer>5</answer>", False),
        ("<think>2+2</think><answer> </answer>", False),
        ("<think>2+2</think> \\boxed{}", False),
        ("<think>2+2</think> the answer is 4", False),
        ("<think> </think><answer>4</answer>", False),
        ("<think>2+2<think>again</think><answer>4</answer>", False),
        ("<think>2+2</think></think><answer>4</answer>", False),
        ("<think>2+2<answer>4</answer>", False),
        ("2+2</think><answer>4</answer>", False),
        ("Sure! <think>2+2</think><answer>4</answer>", False),
        ("<think>2+2</think> \\boxed{4", False),
    ],
)
def test_is_well_formatted(completion, expected):
    assert is_well_formatted(completion) is expected


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("2+2=4\n</think>\n\\boxed{4}", True),
        ("2+2=4</think> <answer>4</answer>", True),
        ("<think>2+2</think><answer>4</answer>", False),
        ("2+2=4 \\boxed{4}", False),
    ],
)
def test_think_in_prompt(completion, expected):
    assert is_well_formatted(completion, think_in_prompt=True) is expected


def test_format_reward_scores():
    reward = FormatReward()
    completions = ["<think>a</think><answer>1</answer>", "1", "<think>a</think> \\boxed{1}"]
    examples = [Example(f"t/{i}", "p", "1") for i in range(3)]
    assert reward.name == "format"
    assert reward(completions, examples) == [1.0, 0.0, 1.0]
    assert FormatReward(think_in_prompt=True)(["a</think>\\boxed{1}"], examples[:1]) == [1.0]
