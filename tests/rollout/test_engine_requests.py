"""The engine's request API (add_request / step / abort): requests that join a running batch get the
tokens they would get alone, each with its own params and seed; abort frees slots at once; deltas
carry one token per sequence per step; top_logprobs are the distribution's own top-k; chunked prefill
(max_num_batched_tokens) keeps running decodes flowing and changes no token."""

from __future__ import annotations

import pytest
import torch

from r1kit.errors import ConfigError
from r1kit.rollout.base import SamplingParams
from r1kit.rollout.engine import Chunks, Engine, SlotCache

from test_engine import PROMPTS, full_forward_logprobs, hf_greedy, tiny_llama


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


def run_until_done(engine: Engine) -> dict:
    """Step until idle; returns {(request_id, index): (token_ids, logprobs, finish_reason)}."""
    got: dict = {}
    while engine.has_unfinished():
        for d in engine.step():
            ids, lps, _ = got.get((d.request_id, d.index), ([], [], None))
            got[(d.request_id, d.index)] = (ids + d.token_ids, lps + d.logprobs, d.finish_reason)
    return got


def test_requests_joining_a_running_batch_get_their_greedy_tokens(tiny):
    engine = Engine(tiny, [], dtype=torch.float32, max_batch=3, max_model_len=128)
    engine.add_request("a", PROMPTS[0], SamplingParams(max_tokens=12, temperature=0))
    got: dict = {}
    for _ in range(4):  # "a" is prefilled and decodes 3 tokens alone
        for d in engine.step():
            got.setdefault(d.request_id, []).extend(d.token_ids)
    assert len(got["a"]) == 4
    engine.add_request("b", PROMPTS[1], SamplingParams(max_tokens=6, temperature=0))
    engine.add_request("c", PROMPTS[2], SamplingParams(max_tokens=9, temperature=0, n=2))  # waits for a slot
    rest = run_until_done(engine)
    assert got["a"] + rest[("a", 0)][0] == hf_greedy(tiny, PROMPTS[0], 12)
    assert rest[("b", 0)][0] == hf_greedy(tiny, PROMPTS[1], 6)
    assert rest[("c", 0)][0] == rest[("c", 1)][0] == hf_greedy(tiny, PROMPTS[2], 9)
    assert engine.stats()["slots_in_use"] == 0 and engine.stats()["requests"] == 0


def test_each_request_has_its_own_params_and_seed(tiny):
    """A seeded request samples the same tokens alone and beside other traffic; its logprobs are the
    full forward's at its own temperature."""
    params = SamplingParams(max_tokens=8, temperature=0.8, top_k=50, seed=7, n=2)
    alone = Engine(tiny, [], dtype=torch.float32, max_batch=4, max_model_len=128)
    alone.add_request("x", PROMPTS[3], params)
    ref = run_until_done(alone)
    busy = Engine(tiny, [], dtype=torch.float32, max_batch=4, max_model_len=128)
    busy.add_request("noise", PROMPTS[1], SamplingParams(max_tokens=10, temperature=1.3, seed=1))
    busy.step()
    busy.add_request("x", PROMPTS[3], params)
    busy.add_request("greedy", PROMPTS[0], SamplingParams(max_tokens=5, temperature=0))
    got = run_until_done(busy)
    assert [got[("x", j)][0] for j in range(2)] == [ref[("x", j)][0] for j in range(2)]
    assert got[("greedy", 0)][0] == hf_greedy(tiny, PROMPTS[0], 5)
    for j in range(2):
        ids, lps, _ = got[("x", j)]
        torch.testing.assert_close(torch.tensor(lps), full_forward_logprobs(tiny, PROMPTS[3], ids, 0.8),
                                   atol=1e-4, rtol=1e-4)


def test_abort_frees_the_slot_at_once_and_stops_the_deltas(tiny):
    engine = Engine(tiny, [], dtype=torch.float32, max_batch=2, max_model_len=128)
    engine.add_request("long", PROMPTS[0], SamplingParams(max_tokens=100, temperature=0, n=2))
    engine.add_request("queued", PROMPTS[1], SamplingParams(max_tokens=4, temperature=0))
    engine.step()
    engine.step()
    assert engine.stats() == {"slots_total": 2, "slots_in_use": 2, "waiting": 1, "prefilling": 0, "requests": 2,
                              "steps": 2}
    assert engine.abort("long", index=1)
    assert engine.stats()["slots_in_use"] == 1
    (first,) = engine.step()  # the freed slot admits "queued" and samples its first token
    assert first.request_id == "queued"
    assert engine.stats()["slots_in_use"] == 2 and engine.stats()["waiting"] == 0
    assert engine.abort("long")
    rest = run_until_done(engine)
    assert set(rest) == {("queued", 0)}
    assert first.token_ids + rest[("queued", 0)][0] == hf_greedy(tiny, PROMPTS[1], 4)
    assert not engine.abort("long") and engine.stats()["slots_in_use"] == 0


def test_abort_of_a_waiting_request_removes_it_from_the_queue(tiny):
    engine = Engine(tiny, [], dtype=torch.float32, max_batch=1, max_model_len=128)
    engine.add_request("a", PROMPTS[0], SamplingParams(max_tokens=3, temperature=0))
    engine.add_request("b", PROMPTS[1], SamplingParams(max_tokens=3, temperature=0))
    assert engine.stats()["waiting"] == 2
    assert engine.abort("b") and engine.stats()["waiting"] == 1
    assert set(run_until_done(engine)) == {("a", 0)}


def test_deltas_are_one_token_per_step_with_the_finish_on_the_last(tiny):
    engine = Engine(tiny, [], dtype=torch.float32, max_batch=2, max_model_len=128)
    engine.add_request(0, PROMPTS[0], SamplingParams(max_tokens=3, temperature=0), top_logprobs=3)
    steps = [engine.step() for _ in range(3)]
    assert [len(s) for s in steps] == [1, 1, 1]
    assert [s[0].finish_reason for s in steps] == [None, None, "length"] and not engine.has_unfinished()
    ids = [s[0].token_ids[0] for s in steps]
    full = torch.tensor([PROMPTS[0] + ids])
    with torch.no_grad():
        logp = tiny(full).logits[0, len(PROMPTS[0]) - 1 : -1].float().log_softmax(-1)  # (3, V)
    for t, s in enumerate(steps):
        (top,) = s[0].top_logprobs
        values, order = logp[t].topk(3)
        assert [i for i, _ in top] == order.tolist() and top[0][0] == ids[t]  # greedy picks the top one
        torch.testing.assert_close(torch.tensor([v for _, v in top]), values, atol=1e-4, rtol=1e-4)


LONG = list(range(1000, 1090))  # 90 prompt tokens: 4 chunks under a budget of 24


def staggered(engine: Engine) -> tuple[dict, list[set]]:
    """Seeded and greedy requests of short and long prompts arriving over the first steps (one aborted
    while its prompt is still being prefilled); returns the outputs and, per step, who got a token."""
    arrivals = {0: [("a", PROMPTS[0], SamplingParams(max_tokens=20, temperature=0.9, seed=3))],
                2: [("long", LONG, SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9, seed=5, n=2)),
                    ("b", PROMPTS[1], SamplingParams(max_tokens=6, temperature=0))],
                3: [("gone", LONG[::-1], SamplingParams(max_tokens=5, temperature=1.0, seed=9))],
                4: [("c", PROMPTS[3], SamplingParams(max_tokens=9, temperature=1.1, top_k=20, seed=11))]}
    got, who, step = {}, [], 0
    while step <= max(arrivals) or engine.has_unfinished():
        for rid, prompt, params in arrivals.get(step, []):
            engine.add_request(rid, prompt, params)
        if step == 5:
            assert engine.abort("gone")
        deltas = engine.step()
        who.append({d.request_id for d in deltas})
        for d in deltas:
            ids, lps, _ = got.get((d.request_id, d.index), ([], [], None))
            got[(d.request_id, d.index)] = (ids + d.token_ids, lps + d.logprobs, d.finish_reason)
        step += 1
    return got, who


def test_chunked_prefill_changes_no_token_and_keeps_decodes_flowing(tiny):
    whole = Engine(tiny, [], dtype=torch.float32, max_batch=6, max_model_len=128)
    chunked = Engine(tiny, [], dtype=torch.float32, max_batch=6, max_model_len=128, max_num_batched_tokens=24)
    ref, ref_who = staggered(whole)
    got, who = staggered(chunked)
    ref.pop(("gone", 0))  # prefilled whole at once, it had started before its abort
    assert set(got) == set(ref)  # chunked, it was aborted while its prompt was still going in
    for key in ref:
        assert got[key][0] == ref[key][0] and got[key][2] == ref[key][2], key
        torch.testing.assert_close(torch.tensor(got[key][1]), torch.tensor(ref[key][1]), atol=1e-4, rtol=1e-4)
    assert ref[("b", 0)][0] == hf_greedy(tiny, PROMPTS[1], 6)
    # Whole prompts: the step that prefills "long" (and "b") gives "a" no token. Chunked: "a" gets a
    # token every step until it finishes, while "long" takes 4+ steps to be prefilled.
    assert "a" not in ref_who[2] and all("a" in w for w in who[:20])
    assert who.index(next(w for w in who if "long" in w)) >= 5
    assert chunked.stats()["slots_in_use"] == chunked.stats()["prefilling"] == 0
    # Aborting the sequence whose slot holds a half-prefilled prompt hands that cache to its sibling.
    chunked.add_request("pair", LONG, SamplingParams(max_tokens=5, temperature=0, n=2))
    chunked.step()
    assert chunked.stats()["prefilling"] == 2 and chunked.abort("pair", index=0)
    assert run_until_done(chunked)[("pair", 1)][0] == hf_greedy(tiny, LONG, 5)
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        Engine(tiny, [], max_batch=8, max_num_batched_tokens=4)


def test_decode_and_prompt_chunks_run_in_one_model_call(tiny, monkeypatch):
    """With a token budget a step is one adapter call: the running decodes plus up to budget - decodes
    prompt tokens (vLLM's chunked prefill); the long prompt goes in over several such steps and every
    greedy completion still equals HF generate."""
    engine = Engine(tiny, [], dtype=torch.float32, max_batch=4, max_model_len=128, max_num_batched_tokens=20)
    adapter, calls = engine.adapter, []
    real_forward = adapter.forward

    def spy(cache, tokens=None, positions=None, span=0, rows=None, chunks=None):
        calls.append((None if rows is None else len(rows), None if chunks is None else chunks.lengths.tolist(),
                      None if chunks is None else chunks.starts.tolist()))
        return real_forward(cache, tokens, positions, span, rows, chunks)

    monkeypatch.setattr(adapter, "forward", spy)
    for name in ("prefill", "decode"):
        monkeypatch.setattr(adapter, name, lambda *a, **k: pytest.fail("a separate prefill or decode call"))
    engine.add_request("a", PROMPTS[0], SamplingParams(max_tokens=14, temperature=0))
    (first,) = engine.step()
    engine.add_request("long", LONG, SamplingParams(max_tokens=6, temperature=0))
    engine.add_request("b", PROMPTS[2], SamplingParams(max_tokens=7, temperature=0))
    got = run_until_done(engine)
    got[("a", 0)] = (first.token_ids + got[("a", 0)][0],)
    assert calls[0] == (None, [len(PROMPTS[0])], [0])  # "a" alone: one chunk, no decode rows
    # "a" decodes (1 row) beside 19 prompt tokens of "long", then 19 more, ...; "long"'s last 14 and the
    # first 5 of "b" go in one call (chunks at starts 76 and 0), "b"'s last 2 beside 2 decodes.
    assert calls[1:7] == [(1, [19], [0]), (1, [19], [19]), (1, [19], [38]), (1, [19], [57]),
                          (1, [14, 5], [76, 0]), (2, [2], [5])]
    assert calls[7] == (3, None, None)  # then all three decode
    for rid, prompt, n in (("a", PROMPTS[0], 14), ("long", LONG, 6), ("b", PROMPTS[2], 7)):
        assert got[(rid, 0)][0] == hf_greedy(tiny, prompt, n), rid
    assert engine.stats()["slots_in_use"] == 0


def test_one_call_equals_a_decode_then_a_prefill(tiny):
    """``forward`` with decode rows and chunks at different starts gives the logits and the cache of a
    ``decode`` followed by one ``prefill`` per chunk start (fp32)."""
    engine = Engine(tiny, [], dtype=torch.float32, max_batch=4, max_model_len=64)
    adapter = engine.adapter
    cache = adapter.new_cache(4, 64)
    # Slots 0, 1 decode (prompts of 5 and 9 tokens in); slot 2 has 6 prompt tokens in, slot 3 none.
    for slot, prompt in ((0, PROMPTS[1][:5]), (1, PROMPTS[1][:9]), (2, LONG[:6])):
        adapter.prefill(torch.tensor([prompt]), torch.tensor([len(prompt)]), cache, torch.tensor([slot]))
    tokens, positions = torch.tensor([11, 12, 13, 0]), torch.tensor([5, 9, len(LONG[:10]) - 1, 0])
    chunk_tokens = torch.tensor([LONG[6:10], [7, 8, 9, 0]])
    chunks = Chunks(chunk_tokens, torch.tensor([4, 3]), torch.tensor([2, 3]), torch.tensor([6, 0]))
    rows = torch.tensor([0, 1])
    one = SlotCache([t.clone() for t in cache.tensors], cache.position_dim, cache.limit, cache.grows)
    dec, pre = adapter.forward(one, tokens, positions, 10, rows, chunks)
    ref_dec = adapter.decode(tokens, positions, cache, 10, rows)
    ref_a = adapter.prefill(chunk_tokens[:1], torch.tensor([4]), cache, torch.tensor([2]), start=6)
    ref_b = adapter.prefill(chunk_tokens[1:, :3], torch.tensor([3]), cache, torch.tensor([3]))
    torch.testing.assert_close(dec, ref_dec, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pre, torch.cat([ref_a, ref_b]), atol=1e-5, rtol=1e-5)
    for got, ref in zip(one.tensors, cache.tensors):  # slot 2's last-position write is the chunk's
        torch.testing.assert_close(got[:, :, :, :10], ref[:, :, :, :10], atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # and the chunk's last logits are HF's at that prompt position
        hf = tiny(torch.tensor([LONG[:10]])).logits[0, -1]
    torch.testing.assert_close(pre[0], hf, atol=1e-4, rtol=1e-4)


def test_request_api_refuses_bad_requests(tiny):
    engine = Engine(tiny, [], dtype=torch.float32, max_batch=2, max_model_len=64)
    with pytest.raises(ConfigError, match="prompt 0 has 64 tokens"):
        engine.add_request("a", [1] * 64, SamplingParams())
    with pytest.raises(ConfigError, match="temperature"):
        engine.add_request("a", [1, 2], SamplingParams(temperature=-1))
    with pytest.raises(ConfigError, match="top_logprobs"):
        engine.add_request("a", [1, 2], SamplingParams(), top_logprobs=-1)
    engine.add_request("a", [1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(ConfigError, match="already in use"):
        engine.add_request("a", [1, 2], SamplingParams())
    with pytest.raises(ConfigError, match="max_model_len"):
        Engine(tiny, [], max_model_len=10_000)
