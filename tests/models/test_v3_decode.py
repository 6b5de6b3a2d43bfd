"""DeepSeek-V3 decoding: cached generation vs transformers and vs padding, the sampling engine, MTP speculative decoding."""

import dataclasses

import pytest
import torch
from v3_helpers import one_thread, tiny_model, transformers_twin  # noqa: F401 (one_thread is an autouse fixture)

from r1kit.errors import ConfigError
from r1kit.models.deepseek_v3 import pretrain_loss
from r1kit.models.v3_decode import V3SamplingEngine, filter_logits, generate, mtp_speculative_generate
from r1kit.rollout.base import SamplingParams

PROMPTS = torch.randint(2, 97, (2, 6), generator=torch.Generator().manual_seed(4))


def test_greedy_generate_matches_transformers():
    model = tiny_model()
    hf = transformers_twin(model)
    ours = generate(model, PROMPTS, max_new_tokens=8)
    theirs = hf.generate(PROMPTS, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.shape == (2, 14)
    assert torch.equal(ours, theirs)


def test_left_padding_does_not_change_a_row():
    model = tiny_model()
    short = PROMPTS[1:, 2:]
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), short], 1)
    batch = torch.cat([PROMPTS[:1], padded])
    mask = torch.ones_like(batch)
    mask[1, :2] = 0
    together = generate(model, batch, max_new_tokens=6, attention_mask=mask)
    alone = generate(model, short, max_new_tokens=6)
    assert torch.equal(together[1, 6:], alone[0, 4:])


def test_eos_stops_and_pads_the_row():
    model = tiny_model()
    free = generate(model, PROMPTS, max_new_tokens=6)
    eos = int(free[0, 8])  # the third generated token of row 0
    stopped = generate(model, PROMPTS, max_new_tokens=6, eos_token_id=eos, pad_token_id=-1)
    first = (free[0, 6:] == eos).nonzero()[0, 0].item()
    assert torch.equal(stopped[0, : 6 + first + 1], free[0, : 6 + first + 1])
    assert (stopped[0, 6 + first + 1 :] == -1).all()


def trained_on_a_cycle(steps=20):
    """A one-layer MoE model trained on 0..9 cycles with the MTP loss, so that drafts are often right."""
    torch.manual_seed(0)
    model = tiny_model(vocab_size=16, num_hidden_layers=1, first_k_dense_replace=0).train()
    data = (torch.arange(24)[None] + torch.arange(4)[:, None]) % 10
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for _ in range(steps):
        pretrain_loss(model, model(data), data)["loss"].backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("trained", [False, True], ids=["random", "trained"])
def test_mtp_speculative_decoding_equals_greedy(trained):
    model = trained_on_a_cycle() if trained else tiny_model()
    prompt = [3, 4, 5, 6] if trained else PROMPTS[0].tolist()
    plain = generate(model, torch.tensor([prompt]), max_new_tokens=20)[0, len(prompt):].tolist()
    result = mtp_speculative_generate(model, prompt, max_new_tokens=20)
    assert result.tokens == plain
    assert result.drafted > 0
    eos = plain[3]
    stopped = mtp_speculative_generate(model, prompt, max_new_tokens=20, eos_token_id=eos)
    assert stopped.tokens == plain[: plain.index(eos) + 1]
    if trained:
        assert plain[:6] == [7, 8, 9, 0, 1, 2]  # it learnt the cycle
        assert result.acceptance_rate > 0.8  # and the MTP module drafts it
        assert result.drafted <= 11  # one forward per two tokens: half the main-model passes


def full_forward_logprobs(model, prompt, tokens, temperature=1.0):
    """log p(token_j | prefix) from one uncached forward over prompt + tokens."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return logits.log_softmax(-1).gather(1, torch.tensor(tokens)[:, None]).squeeze(1)


def test_engine_greedy_matches_generate_and_reports_exact_logprobs():
    model = tiny_model()
    engine = V3SamplingEngine(model)
    prompts = [PROMPTS[0].tolist(), PROMPTS[1, 3:].tolist()]
    out = engine.generate(prompts, SamplingParams(max_tokens=7, temperature=0.0))
    assert [c.prompt_index for c in out] == [0, 1] and all(c.finish_reason == "length" for c in out)
    for prompt, comp in zip(prompts, out):
        assert comp.token_ids == generate(model, torch.tensor([prompt]), 7)[0, len(prompt):].tolist()
        torch.testing.assert_close(torch.tensor(comp.logprobs), full_forward_logprobs(model, prompt, comp.token_ids),
                                   atol=1e-5, rtol=0)


def test_engine_sampling_is_seeded_prompt_major_and_stops():
    model = tiny_model()
    engine = V3SamplingEngine(model)
    params = SamplingParams(max_tokens=6, temperature=0.7, top_p=0.9, n=3, seed=5)
    first = engine.generate([PROMPTS[0].tolist()], params)
    again = engine.generate([PROMPTS[0].tolist()], params)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert len({tuple(c.token_ids) for c in first}) > 1  # three different samples
    comp = first[0]
    torch.testing.assert_close(torch.tensor(comp.logprobs),
                               full_forward_logprobs(model, PROMPTS[0].tolist(), comp.token_ids, 0.7),
                               atol=1e-5, rtol=0)
    stop = comp.token_ids[2]
    stopped = engine.generate([PROMPTS[0].tolist()], dataclasses.replace(params, stop_token_ids=[stop]))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids[-1] == stop
    assert stopped.token_ids == comp.token_ids[: comp.token_ids.index(stop) + 1]


def test_filter_logits_hand_values():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).log_softmax(-1)  # probs .64 .24 .09 .03
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    nucleus = filter_logits(logits, top_p=0.8)
    assert torch.isfinite(nucleus[0, :2]).all() and torch.isinf(nucleus[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, top_p=0.95)[0, :3]).all()


def test_engine_refuses_stop_strings_and_long_prompts():
    engine = V3SamplingEngine(tiny_model(max_position_embeddings=16))
    with pytest.raises(ConfigError, match="stop_token_ids"):
        engine.generate([[3, 4]], SamplingParams(max_tokens=2, stop=["\n"]))
    with pytest.raises(ConfigError, match="prompt 0 has 15 tokens"):
        engine.generate([list(range(15))], SamplingParams(max_tokens=4))
