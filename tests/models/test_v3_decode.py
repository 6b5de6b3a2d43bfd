"""DeepSeek-V3 decoding: cached generation vs transformers and vs padding, MTP speculative decoding."""

import pytest
import torch
from v3_helpers import tiny_model, transformers_twin

from r1kit.models.deepseek_v3 import pretrain_loss
from r1kit.models.v3_decode import generate, mtp_speculative_generate

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
    if trained:
        assert plain[:6] == [7, 8, 9, 0, 1, 2]  # it learnt the cycle
        assert result.acceptance_rate > 0.8  # and the MTP module drafts it
        assert result.drafted <= 11  # one forward per two tokens: half the main-model passes
