"""Rejection sampling against an OpenAI-compatible endpoint: a real FastAPI app under uvicorn on the
loopback address returning fixed completions, one per check of the sampler; and the endpoint's
failures (refused, timed out, HTTP error) as one clear error each."""

import asyncio
import json
import socket
import threading
import time

import pytest

from r1kit.data.loading import load_task
from r1kit.errors import R1kitError
from r1kit.pipeline.sample import CHECKS, jaccard, run_sample, sample_config, shard_seed, shingles

NUM_SAMPLES = 4
LONG = " ".join(f"Step {i} keeps the count." for i in range(90))  # one paragraph of 450 words
SAM = ("Sam had 9 marbles at the start of the day and then he lost 2 of them while playing in the park "
       "with his friends after school, so we subtract the lost marbles from the marbles he had: 9 - 2 = 7")


def completions(gsm8k_question: str) -> dict[str, list[dict]]:
    """Question → its four fixed replies (content, and reasoning_content when given)."""
    return {
        "Tom has 3 apples and buys 4 more. How many apples does he have?": [
            {"reasoning_content": "Tom starts with 3 apples and buys 4 more, so he has 3 + 4 = 7 apples.",
             "content": "\\boxed{7}"},                                                   # kept
            {"content": "<think>\nHe had 3 apples, then he bought 4, so the total is 7.\n</think>\n\nSo \\boxed{7}."},  # kept
            {"content": "<think>\nHe had 3 apples,   then he bought 4, so the TOTAL is 7.\n</think>\nSo \\boxed{7}"},  # duplicate
            {"content": "<think>\nHe has 3 + 4 apples, that is 8.\n</think>\n\\boxed{8}"},  # verifier
        ],
        "Anna reads 5 pages each day for 2 days. How many pages does she read?": [
            {"content": "<think>\nAnna reads pages each day, 两天一共读了十页书 so the total is ten.\n</think>\n\\boxed{10}"},  # language
            {"content": "<think>\n" + "I add the pages again. " * 20 + "\n</think>\n\\boxed{10}"},  # repetition
            {"content": "<think>\nCompute it:\n```python\nprint(5 * 2)\n```\nIt prints 10.\n</think>\n\\boxed{10}"},  # code_block
            {"content": f"<think>\n{LONG}\n</think>\n\\boxed{{10}}"},                     # long_paragraph
        ],
        "Sam had 9 marbles and lost 2. How many marbles are left?": [
            {"content": f"<think>\n{SAM} marbles are left.\n</think>\n\\boxed{{7}}"},       # kept
            {"content": f"<think>\n{SAM} marbles are left now.\n</think>\n\\boxed{{7}}"},   # near_duplicate
            {"content": f"<think>\nThis is like: {gsm8k_question}\n9 - 2 = 7.\n</think>\n\\boxed{{7}}"},  # decontam
            {"content": f"<think>\n{SAM}, so \\boxed{{7}}"},                                # unclosed_reasoning
        ],
        "Ben has 2 cats and gets 3 more. How many cats does he have?": [
            {"reasoning_content": "Ben has 2 cats and gets 3 more, so \\boxed{5}", "content": None},  # unclosed_reasoning
            {"reasoning": "Two cats and three more cats make five cats.", "content": "\\boxed{5}"},  # kept (vLLM's field)
            {"reasoning_content": "", "content": "\\boxed{5}"},                                  # kept: empty reasoning
            {"reasoning_content": "Two and three make six.", "content": "\\boxed{6}"},          # verifier
        ],
    }


@pytest.fixture(scope="module")
def gsm8k_test():
    return load_task("gsm8k", "test")


@pytest.fixture(scope="module")
def endpoint(gsm8k_test):
    """(base URL, the list of requests it received) of a live OpenAI-compatible chat endpoint."""
    import uvicorn
    from fastapi import FastAPI, HTTPException

    table = completions(gsm8k_test[0].prompt)
    requests: list[dict] = []
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        requests.append(body)
        if body["model"] == "slow":
            await asyncio.sleep(3)
        if body["model"] not in ("teacher", "slow"):
            raise HTTPException(404, f"model {body['model']!r} not found")
        question = body["messages"][-1]["content"].split("\n\n")[0]
        reply = table[question][(body["seed"] - shard_seed(0, 0)) % NUM_SAMPLES]
        return {"id": "cmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", **reply}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    @app.post("/v1/completions")
    async def complete(body: dict):
        requests.append(body)
        text = ["Three and four make seven.\n</think>\n\n\\boxed{7}",
                "Three and four make seven, so \\boxed{7}"][(body["seed"] - shard_seed(0, 0)) % 2]
        return {"id": "cmpl-2", "object": "text_completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}]}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline and thread.is_alive()
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}/v1", requests
    server.should_exit = True
    thread.join(timeout=10)


def write_task(path, gsm8k_test):
    svamp = load_task("svamp", "test")[0].prompt.split()
    rows = [{"question": q, "answer": a} for q, a in (
        ("Tom has 3 apples and buys 4 more. How many apples does he have?", "7"),
        ("Anna reads 5 pages each day for 2 days. How many pages does she read?", "10"),
        ("Sam had 9 marbles and lost 2. How many marbles are left?", "7"),
        ("Ben has 2 cats and gets 3 more. How many cats does he have?", "5"),
        (gsm8k_test[5].prompt, gsm8k_test[5].gold),                                  # planted verbatim
        ("Here is a puzzle. " + " ".join(svamp[:9]) + " Think about it and answer 3.", "3"),  # 8-gram inside
    )]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_endpoint_teacher_every_check(endpoint, gsm8k_test, tmp_path):
    url, requests = endpoint
    task = write_task(tmp_path / "words.jsonl", gsm8k_test)
    sam = completions("")["Sam had 9 marbles and lost 2. How many marbles are left?"]
    assert jaccard(shingles(sam[0]["content"], 5), shingles(sam[1]["content"], 5)) >= 0.8  # the planted near-dup
    cfg = sample_config(teacher="teacher", teacher_url=url, task=str(task), template="chat_boxed",
                        num_samples=NUM_SAMPLES, output=str(tmp_path / "out"), max_tokens=64)
    out = run_sample(cfg, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts == {"sampled": 16, "kept": 5, **dict.fromkeys(CHECKS, 1), "max_per_prompt": 0, "verifier": 2,
                      "unclosed_reasoning": 2}
    assert manifest["prompts_decontaminated"] == 2 and manifest["prompts_sampled"] == 4
    kept = [json.loads(line) for line in (out / "shards" / "shard-00000.jsonl").read_text().splitlines()]
    dropped = [json.loads(line) for line in (out / "dropped" / "shard-00000.jsonl").read_text().splitlines()]
    assert [r["id"] for r in kept] == ["words/0#0", "words/0#1", "words/2#0", "words/3#1", "words/3#2"]
    assert kept[3]["reasoning"] == "Two cats and three more cats make five cats." and kept[4]["reasoning"] == ""
    assert kept[0]["reasoning"] == "Tom starts with 3 apples and buys 4 more, so he has 3 + 4 = 7 apples."
    assert kept[0]["answer"] == "\\boxed{7}" and kept[1]["answer"] == "So \\boxed{7}."
    assert kept[0]["teacher"] == "teacher" and kept[0]["teacher_url"] == url and kept[0]["weights_sha256"] is None
    assert kept[0]["verdict"] == {"correct": True, "score": 1.0, "reason": "ok", "extracted": "7"}
    assert kept[0]["seed"] == shard_seed(0, 0) and kept[1]["seed"] == shard_seed(0, 0) + 1
    assert {r["id"]: r["dropped_by"] for r in dropped} == {
        "words/0#2": "duplicate", "words/0#3": "verifier", "words/1#0": "language", "words/1#1": "repetition",
        "words/1#2": "code_block", "words/1#3": "long_paragraph", "words/2#1": "near_duplicate",
        "words/2#2": "decontam", "words/2#3": "unclosed_reasoning", "words/3#0": "unclosed_reasoning",
        "words/3#3": "verifier"}
    by_id = {r["id"]: r for r in dropped}
    assert by_id["words/2#2"]["detail"]["eval_id"] == gsm8k_test[0].id
    assert by_id["words/0#2"]["detail"] == "same normalized text as kept sample 1 of this prompt"
    assert by_id["words/2#1"]["detail"].endswith("with kept sample 0 of this prompt")
    assert by_id["words/1#0"]["quality"]["language"] == pytest.approx(10 / 19)  # 10 English words, 9 Han characters
    prompts = [json.loads(line) for line in (out / "dropped" / "decontaminated_prompts.jsonl").read_text().splitlines()]
    assert [(p["prompt_id"], p["detail"]["rule"]) for p in prompts] == [("words/4", "question"), ("words/5", "question")]
    assert prompts[0]["detail"]["eval_id"] == gsm8k_test[5].id and prompts[1]["detail"]["eval_id"].startswith("svamp/test/")
    asked = {r["messages"][-1]["content"].split("\n\n")[0] for r in requests if r["model"] == "teacher"}
    assert gsm8k_test[5].prompt not in asked and len(asked) == 4  # contaminated prompts are never sampled
    assert all(r["temperature"] == 1.0 and r["max_tokens"] == 64 and r["n"] == 1 for r in requests)
    capped = run_sample(sample_config(**{**cfg.to_dict(), "max_per_prompt": 1, "output": str(tmp_path / "capped")}),
                        progress=False)
    counts = json.loads((capped / "manifest.json").read_text())["counts"]
    assert counts["kept"] == 3 and counts["max_per_prompt"] == 3 and counts["duplicate"] == 0  # words/0#1, 0#2, 3#2


def test_completions_api_renders_the_prompt_like_a_local_teacher(endpoint, tiny_model_dir, tmp_path):
    """teacher_api=completions: the server receives r1kit's own rendering (chat_think's <think> prefill),
    and the completion is split as one that starts inside the reasoning."""
    from transformers import AutoTokenizer

    from r1kit.data.templates import get_template, render_prompt

    url, requests = endpoint
    question = "Tom has 3 apples and buys 4 more. How many apples does he have?"
    task = tmp_path / "one.jsonl"
    task.write_text(json.dumps({"question": question, "answer": "7"}) + "\n")
    cfg = sample_config(teacher="teacher", teacher_url=url, teacher_api="completions",
                        teacher_tokenizer=str(tiny_model_dir), task=str(task), template="chat_think", num_samples=2,
                        output=str(tmp_path / "out"), decontaminate=False)
    out = run_sample(cfg, progress=False)
    prompts = [r["prompt"] for r in requests if "prompt" in r]
    expected = render_prompt(load_task(str(task))[0], AutoTokenizer.from_pretrained(tiny_model_dir),
                             get_template("chat_think"))
    assert prompts == [expected] * 2 and expected.endswith("<think>\n")
    (row,) = [json.loads(line) for line in (out / "shards" / "shard-00000.jsonl").read_text().splitlines()]
    assert (row["reasoning"], row["answer"], row["think_in_prompt"]) == ("Three and four make seven.", "\\boxed{7}", True)
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["kept"] == 1 and counts["unclosed_reasoning"] == 1


def test_endpoint_that_times_out_is_one_clear_error(endpoint, tmp_path):
    url, _ = endpoint
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
                                "answer": "7"}) + "\n")
    cfg = sample_config(teacher="slow", teacher_url=url, task=str(task), template="chat_boxed", num_samples=1,
                        request_timeout=0.5, max_retries=0, output=str(tmp_path / "out"), decontaminate=False)
    with pytest.raises(R1kitError, match=r"did not answer within 0.5 s .*--request-timeout"):
        run_sample(cfg)
    assert not (tmp_path / "out" / "shards").exists()


def test_endpoint_http_error_names_the_model(endpoint, tmp_path):
    url, _ = endpoint
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"question": "What is 1 plus 1?", "answer": "2"}) + "\n")
    cfg = sample_config(teacher="nope", teacher_url=url, task=str(task), num_samples=1, max_retries=0,
                        output=str(tmp_path / "out"), decontaminate=False)
    with pytest.raises(R1kitError, match=r"answered HTTP 404 .*--teacher"):
        run_sample(cfg)


def test_endpoint_that_refuses_is_one_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"question": "What is 1 plus 1?", "answer": "2"}) + "\n")
    cfg = sample_config(teacher="teacher", teacher_url=f"http://127.0.0.1:{port}/v1", task=str(task), num_samples=1,
                        max_retries=0, output=str(tmp_path / "out"), decontaminate=False)
    with pytest.raises(R1kitError, match=r"refused the connection .*--teacher-url"):
        run_sample(cfg)
