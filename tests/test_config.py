"""Run configuration: every preset resolves and validates; the demo presets hold what the README says."""

import re

import pytest

from r1kit.config import PRESETS, GRPOConfig, SFTConfig, load_config
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


@pytest.mark.parametrize("cls, field, value, needle", [
    (GRPOConfig, "learning_rate", float("nan"), "learning_rate must be a finite number, got nan"),
    (GRPOConfig, "learning_rate", -1.0, "learning_rate must be >= 0 (0 = frozen weights), got -1.0"),
    (GRPOConfig, "beta", float("nan"), "beta must be a finite number"),
    (GRPOConfig, "epsilon", -1.0, "epsilon must be >= 0"),
    (GRPOConfig, "adam_beta2", float("nan"), "adam_beta2 must be a finite number"),
    (GRPOConfig, "warmup_steps", -5, "warmup_steps must be >= 0"),
    (GRPOConfig, "seed", -1, "seed must be >= 0"),
    (SFTConfig, "adam_beta1", 2.0, "adam_beta1 must be in [0, 1)"),
    (SFTConfig, "weight_decay", -1.0, "weight_decay must be >= 0"),
    (SFTConfig, "max_grad_norm", float("nan"), "max_grad_norm must be a finite number"),
])
def test_optimizer_and_float_fields_are_refused_out_of_range(cls, field, value, needle):
    """A fresh user's `--learning-rate -1` was a torch traceback and `--beta nan` a 'non-finite loss'
    at step 1 advising a lower learning rate."""
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(overrides={field: value}, cls=cls)
