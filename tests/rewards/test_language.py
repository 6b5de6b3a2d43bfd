"""The language-consistency reward: the documented word model, hand-counted fractions, and errors."""

import pytest

from r1kit.data.base import Example
from r1kit.errors import ConfigError
from r1kit.rewards.functions import build_reward_functions
from r1kit.rewards.language import LanguageReward, language_consistency, majority_language, segments
from r1kit.rewards.math import MathVerifier

ENGLISH = "First we add the two numbers together. Then we check the result against the question."


def test_single_language_reasoning_scores_one():
    assert language_consistency(ENGLISH, "en") == 1.0
    assert language_consistency("我们先把两个数加起来，然后检查结果。", "zh") == 1.0
    assert language_consistency("Nous additionnons les deux nombres, puis nous vérifions le résultat.", "fr") == 1.0


def test_mixed_reasoning_gives_the_share_of_target_words():
    # 6 English words; 所以答案是 = 5 Han characters, one word each; 42 is not a word
    text = "Let me compute the sum first. 所以答案是 42."
    assert language_consistency(text, "en") == pytest.approx(6 / 11)
    assert language_consistency(text, "zh") == pytest.approx(5 / 11)
    # two long sentences in two Latin-script languages: 6 French words, 5 English words
    assert language_consistency("Je pense donc que je suis. I think that I am.", "en") == pytest.approx(5 / 11)


def test_numbers_latex_and_code_are_not_words():
    plain = "We add the numbers and check the result."
    noisy = ("We add $x^2 + \\frac{3}{4}$ the numbers 12, 3.5 and 3x = 7 \\(\\alpha\\) check "
             "\\[\\sum_i a_i\\] the `len(xs)` result.\n```python\nprint('bonjour le monde')\n```\n\\boxed{42}")
    assert [c for _, c, _ in segments(noisy)] == [c for _, c, _ in segments(plain)] == [8]
    assert language_consistency(noisy, "en") == 1.0
    assert segments("$$E = mc^2$$ 3 + 4 = 7 `code` \\begin{align} a &= b \\end{align}") == []


def test_a_sentence_in_another_latin_language_counts_against():
    text = "We add the two numbers. Ich denke also bin ich. Then we check the result again."
    assert language_consistency(text, "en") == pytest.approx(11 / 16)  # 11 English words, 5 German


def test_english_reference_solutions_score_one():
    """No false mixing on real English worked solutions (numbers, calculator annotations, LaTeX)."""
    from r1kit.data.loading import load_task

    solutions = [e.meta["solution"] for e in load_task("gsm8k", "train")[:100]]
    solutions += [e.meta["solution"] for e in load_task("math500", "test")[:50]]
    assert [language_consistency(s, "en") for s in solutions] == [1.0] * 150


def test_short_segments_take_the_language_of_their_script():
    # "4 * 5 minutes = 20 minutes" leaves "minutes minutes", which lingua alone calls French
    assert language_consistency("The machine makes 4 shirts per minute. 4 * 5 minutes = 20 minutes", "en") == 1.0
    assert language_consistency("Compute it: It prints 10.", "en") == 1.0
    assert language_consistency("If Ariella has $400 + $200 = $600 in cows.", "en") == 1.0


def test_dollar_amounts_are_not_latex():
    text = "Ariella has $200 more in her account than Daniella has, so she has $400 + $200 = $600 and $x$ more."
    words = [c for _, c, _ in segments(text)]
    assert words == [14]  # every word between the dollar amounts counts; only $x$ is math


def test_empty_reasoning_is_defined_as_one():
    assert language_consistency(None, "en") == 1.0
    assert language_consistency("", "en") == 1.0
    assert language_consistency("$x = 2$, 42", "zh") == 1.0


def test_unknown_language_code_is_one_clear_error():
    with pytest.raises(ConfigError, match="unknown language code 'xx'.*ISO 639-1"):
        language_consistency(ENGLISH, "xx")
    with pytest.raises(ConfigError, match="unknown language code 'klingon'"):
        LanguageReward(languages=["en", "klingon"])


def test_reward_targets_the_question_language_and_is_a_builtin():
    english = Example("e", "How many apples does Tom have after he buys four more?", "7")
    chinese = Example("c", "汤姆再买四个苹果后有几个苹果？", "7")
    bare = Example("b", "37+48=", "85")
    completion = "<think>\nTom has three apples and buys four more apples.\n</think>\n\\boxed{7}"
    (fn, weight), = build_reward_functions(["language"], None, MathVerifier())
    assert fn.name == "language" and weight == 1.0
    assert fn([completion] * 3, [english, chinese, bare]) == [1.0, 0.0, 1.0]
    assert majority_language(chinese.prompt) == "zh" and majority_language(bare.prompt) is None
    prefilled = LanguageReward(think_in_prompt=True)  # the prompt opened <think>: the CoT runs to </think>
    assert prefilled(["Tom has apples. 他有七个。\n</think>\n\\boxed{7}"], [english]) == [pytest.approx(3 / 7)]
    assert LanguageReward(target_language="zh")([completion], [english]) == [0.0]
