"""HFGenerateEngine stops on every EOS id of the model (issue 10): the tokenizer's and the list in
``generation_config.eos_token_id``, the same rule (``eos_ids_of``) as r1kit's engine."""

import copy

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from r1kit.rollout.base import SamplingParams
from r1kit.rollout.engine import eos_ids_of
from r1kit.rollout.hf import HFGenerateEngine


def test_stops_on_a_generation_config_eos_id(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    prompt = [tok("Hello there", add_special_tokens=False)["input_ids"]]
    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=8, seed=0)
    free = HFGenerateEngine(model, tok).generate(prompt, greedy)[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 8
    end_of_turn = free.token_ids[0]  # make it the token a chat model ends its turn with
    assert end_of_turn != tok.eos_token_id
    multi = copy.deepcopy(model)
    multi.generation_config.eos_token_id = [tok.eos_token_id, end_of_turn]
    engine = HFGenerateEngine(multi, tok)
    assert engine.eos_ids == eos_ids_of(multi, tok)[0] == sorted({tok.eos_token_id, end_of_turn})
    stopped = engine.generate(prompt, greedy)[0]
    assert stopped.token_ids == [end_of_turn]
    assert stopped.finish_reason == "stop"
