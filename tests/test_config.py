"""Run configuration: every preset resolves and validates; the demo presets hold what the README says."""

import pytest

from r1kit.config import PRESETS, load_config
from r1kit.errors import ConfigError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_resolves_and_validates(name):
    cfg = load_config(name)
    for field, value in PRESETS[name].items():
        assert getattr(cfg, field) == value, field


def test_gsm8k_demo_is_the_svamp_demo_loop_on_gsm8k():
    svamp, gsm8k = load_config("cpu_demo"), load_config("cpu_demo_gsm8k")
    assert (gsm8k.task, gsm8k.eval_limit, gsm8k.template) == ("gsm8k", 200, "chat_boxed")
    same = ("num_generations", "prompts_per_step", "learning_rate", "loss_type", "beta", "num_iterations")
    assert [getattr(gsm8k, f) for f in same] == [getattr(svamp, f) for f in same]
    # both demos fit 30 minutes: training is capped, evaluation covers at least 200 held-out problems
    assert svamp.max_train_minutes and gsm8k.max_train_minutes and min(svamp.eval_limit, gsm8k.eval_limit) >= 200


def test_time_budget_must_be_positive():
    with pytest.raises(ConfigError, match="max_train_minutes must be > 0"):
        load_config(overrides={"max_train_minutes": 0})


@pytest.mark.parametrize("share", [0, 1.5])
def test_collapse_share_must_be_a_share(share):
    with pytest.raises(ConfigError, match=f"warn_answer_share must be in \\(0, 1\\], got {share}"):
        load_config(overrides={"warn_answer_share": share})


def test_stop_on_the_command_line_unescapes_newlines():
    assert load_config(overrides={"stop": "\\n"}).stop == ["\n"]
    assert load_config(overrides={"stop": "\\n\\n,Q:"}).stop == ["\n\n", "Q:"]
    assert load_config("cpu_demo").stop == ["\n"]
