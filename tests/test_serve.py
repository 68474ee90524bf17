"""`jointrag serve` on the tiny models, through FastAPI's TestClient: every endpoint, streaming (the
server's own events and OpenAI's chunks), the run view's data, bad requests (a 4xx and one line, and
the server keeps serving), and the batcher that runs concurrent requests together."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

import jointrag
from cli_helpers import assert_user_error, write_jsonl
from conftest import QA
from jointrag.serve.app import MAX_BODY_BYTES, MAX_K, MAX_QUESTION_CHARS, MAX_QUESTIONS, create_app
from jointrag.serve.batcher import Batcher

pytestmark = pytest.mark.usefixtures("isolated_home")

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def pipelines(index_dir, tiny_dir):
    main = jointrag.open(index_dir, generator=str(tiny_dir / "causal"), precision="fp32")
    other = jointrag.open(index_dir, generator=str(tiny_dir / "seq2seq"), precision="fp32")
    return main, other


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two run directories: plots in the first, predictions in both, disagreeing on q2."""
    root = tmp_path_factory.mktemp("runs")
    a, b = root / "a", root / "b"
    (a / "plots").mkdir(parents=True)
    (a / "plots" / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    (b / "eval").mkdir(parents=True)
    rows = [{"id": q["id"], "question": q["question"], "answers": q["answers"], "prediction": q["answers"][0], "em": 1.0, "f1": 1.0}
            for q in QA]
    write_jsonl(a / "predictions.jsonl", rows)
    write_jsonl(b / "eval" / "predictions.jsonl", [dict(r, prediction="Lyon", em=0.0, f1=0.0) if r["id"] == "q2" else r for r in rows])
    return [str(a), str(b)]


@pytest.fixture(scope="module")
def client(pipelines, runs):
    main, other = pipelines
    with TestClient(create_app(main, compare=other, runs=runs, window=0.05, max_batch=8)) as client:
        yield client


def events(response) -> list[tuple[str, object]]:
    """(event, data) of a server-sent event stream; OpenAI's unnamed events are 'message', [DONE] as is."""
    out = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        name, data = "message", ""
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data += line[6:]
        out.append((name, data if data == "[DONE]" else json.loads(data)))
    return out


# --- the endpoints --------------------------------------------------------------------------------


def test_health_and_models(client, index_dir, tiny_dir):
    health = client.get("/health").json()
    assert health["status"] == "ok"
    assert health["models"]["main"] == {"index": str(index_dir), "checkpoint": None, "generator": str(tiny_dir / "causal"),
                                        "bridge": False}
    assert health["models"]["compare"]["generator"] == str(tiny_dir / "seq2seq")
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["main", "compare"]


def test_retrieve(client, pipelines):
    one = client.post("/v1/retrieve", json={"question": QUESTION, "k": 3}).json()["results"]
    assert len(one) == 1 and one[0]["question"] == QUESTION
    expected = pipelines[0].retrieve(QUESTION, k=3)[0]
    assert [p["id"] for p in one[0]["passages"]] == [h.id for h in expected]
    assert set(one[0]["passages"][0]) == {"id", "title", "text", "score", "rank", "used"}
    several = client.post("/v1/retrieve", json={"questions": [q["question"] for q in QA], "k": 2}).json()["results"]
    assert [r["question"] for r in several] == [q["question"] for q in QA] and all(len(r["passages"]) == 2 for r in several)


@pytest.mark.parametrize("model", ["main", "compare"])
def test_answer(client, pipelines, model):
    pipeline = pipelines[0 if model == "main" else 1]
    body = {"question": QUESTION, "k": 3, "contexts": 2, "max_new_tokens": 4, "model": model}
    [answer] = client.post("/v1/answer", json=body).json()["answers"]
    expected = pipeline.answer(QUESTION, k=3, contexts=2, max_new_tokens=4)[0]
    assert answer["answer"] == expected.answer and answer["question"] == QUESTION
    assert [(p["id"], p["used"]) for p in answer["passages"]] == [(h.id, h.used) for h in expected.passages]
    assert set(answer["timings"]) == {"retrieve_s", "generate_s"}
    questions = [q["question"] for q in QA]
    answers = client.post("/v1/answer", json={"questions": questions, "max_new_tokens": 4, "model": model}).json()["answers"]
    assert [a["answer"] for a in answers] == [a.answer for a in pipeline.answer(questions, max_new_tokens=4)]


def test_answer_streams_tokens_then_the_passages(client, pipelines):
    body = {"question": QUESTION, "k": 3, "contexts": 2, "max_new_tokens": 12, "stream": True}
    with client.stream("POST", "/v1/answer", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        response.read()
    got = events(response)
    tokens = [data["text"] for name, data in got if name == "token"]
    [(last, done)] = got[len(tokens):]
    expected = pipelines[0].answer(QUESTION, k=3, contexts=2, max_new_tokens=12)[0]
    assert last == "done" and "".join(tokens) == done["answer"] == expected.answer
    assert [p["used"] for p in done["passages"]] == [True, True, False] and "generate_s" in done["timings"]


def test_a_decoder_that_cannot_stream_sends_its_answer_whole(client, pipelines):
    body = {"question": QUESTION, "k": 3, "max_new_tokens": 4, "decode": "rag-token", "stream": True}
    got = events(client.post("/v1/answer", json=body))
    expected = pipelines[0].answer(QUESTION, k=3, max_new_tokens=4, decode="rag-token")[0].answer
    assert [name for name, _ in got] == ["token", "done"] and got[0][1]["text"] == got[1][1]["answer"] == expected


def test_chat_completions(client, pipelines):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    reply = client.post("/v1/chat/completions", json={"model": "main", "messages": messages, "max_tokens": 4, "temperature": 0.7}).json()
    expected = pipelines[0].answer(QUESTION, max_new_tokens=4)[0]
    assert reply["object"] == "chat.completion" and reply["model"] == "main" and reply["id"].startswith("chatcmpl-")
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": expected.answer}
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert [p["id"] for p in reply["passages"]] == [h.id for h in expected.passages]
    other = client.post("/v1/chat/completions", json={"model": "compare", "messages": messages[-1:], "max_tokens": 4}).json()
    assert other["choices"][0]["message"]["content"] == pipelines[1].answer(QUESTION, max_new_tokens=4)[0].answer


def test_chat_completions_stream_in_openai_chunks(client, pipelines):
    body = {"messages": [{"role": "user", "content": QUESTION}], "stream": True, "max_tokens": 12, "k": 3}
    got = events(client.post("/v1/chat/completions", json=body))
    assert got[-1] == ("message", "[DONE]")
    chunks = [data for _, data in got[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == pipelines[0].answer(QUESTION, k=3, max_new_tokens=12)[0].answer
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and len(chunks[-1]["passages"]) == 3
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_the_page_and_the_run_view(client, runs):
    for path in ("/", "/runs?dir=x"):
        page = client.get(path)
        assert page.status_code == 200 and "<title>jointrag</title>" in page.text
        assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere
    listed = client.get("/v1/runs").json()["runs"]
    assert [r["name"] for r in listed] == runs
    assert listed[0]["plots"] == ["loss.png"] and listed[1]["plots"] == []
    assert listed[1]["predictions"].endswith("eval/predictions.jsonl")
    png = client.get("/v1/runs/plot", params={"run": runs[0], "file": "loss.png"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG")
    rows = client.get("/v1/runs/predictions", params={"run": runs[0], "other": runs[1]}).json()["rows"]
    assert [r["id"] for r in rows if r["disagree"]] == ["q2"]
    assert rows[1]["other"]["prediction"] == "Lyon" and rows[0]["other"]["prediction"] == rows[0]["prediction"]
    alone = client.get("/v1/runs/predictions", params={"run": runs[1]}).json()["rows"]
    assert not any(r["disagree"] for r in alone) and all(r["other"] is None for r in alone)


@pytest.mark.parametrize(("path", "params", "fragment"), [
    ("/v1/runs/plot", {"run": "/etc", "file": "passwd"}, "is not one this server was started with"),
    ("/v1/runs/plot", {"run": "RUN0", "file": "../predictions.jsonl"}, "has no plot"),
    ("/v1/runs/predictions", {"run": "RUN0", "other": "/tmp"}, "is not one this server was started with"),
])
def test_the_run_view_reads_only_the_runs_it_was_given(client, runs, path, params, fragment):
    params = {key: runs[0] if value == "RUN0" else value for key, value in params.items()}
    response = client.get(path, params=params)
    assert response.status_code == 404 and fragment in response.json()["detail"]


# --- bad requests -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "fragment"), [
    ({"question": ""}, "question: String should have at least 1 character"),
    ({"question": "   "}, "question: String should have at least 1 character"),
    ({"question": "x" * (MAX_QUESTION_CHARS + 1)}, f"at most {MAX_QUESTION_CHARS} characters"),
    ({"question": "q", "k": 0}, "k: Input should be greater than or equal to 1"),
    ({"question": "q", "k": MAX_K + 1}, f"k: Input should be less than or equal to {MAX_K}"),
    ({"question": "q", "k": "five"}, "k: Input should be a valid integer"),
    ({"question": "q", "questions": ["r"]}, "give either 'question' or 'questions'"),
    ({}, "give either 'question' or 'questions'"),
    ({"questions": []}, "questions: List should have at least 1 item"),
    ({"questions": ["q"] * (MAX_QUESTIONS + 1)}, f"at most {MAX_QUESTIONS} items"),
    ({"question": "q", "decode": "best"}, "decode: Value error, must be one of top1"),
    ({"question": "q", "max_new_tokens": 10_000}, "max_new_tokens: Input should be less than or equal to"),
    ({"questions": ["q", "r"], "stream": True}, "stream answers one 'question'"),
    ({"question": "q", "temperature": 0.5}, "temperature: Extra inputs are not permitted"),
    ({"question": "q", "model": "gpt-4"}, "model 'gpt-4' is not served here; models: main, compare"),
])
def test_a_bad_answer_request_is_a_4xx_with_one_line(client, body, fragment):
    response = client.post("/v1/answer", json=body)
    assert 400 <= response.status_code < 500
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and fragment in detail, detail


def test_malformed_and_oversized_bodies_are_refused(client):
    response = client.post("/v1/retrieve", content=b'{"question": ', headers={"content-type": "application/json"})
    assert response.status_code == 422 and "JSON" in response.json()["detail"]
    big = json.dumps({"question": "q", "padding": "x" * MAX_BODY_BYTES}).encode()
    response = client.post("/v1/answer", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and f"larger than {MAX_BODY_BYTES} bytes" in response.json()["detail"]
    chunked = client.post("/v1/answer", content=iter([big[:1000], big[1000:]]), headers={"content-type": "application/json"})
    assert chunked.status_code == 413


@pytest.mark.parametrize(("body", "status", "fragment"), [
    ({"messages": []}, 422, "messages: List should have at least 1 item"),
    ({"messages": [{"role": "system", "content": "hi"}]}, 400, "the last user message is missing or empty"),
    ({"messages": [{"role": "user", "content": " "}]}, 400, "the last user message is missing or empty"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "q"}]}, 404, "model 'gpt-4' is not served here"),
    ({"messages": [{"role": "user", "content": "q"}], "max_tokens": 0}, 422, "max_tokens"),
])
def test_a_bad_chat_request_gets_openais_error_shape(client, body, status, fragment):
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status
    assert fragment in response.json()["error"]["message"] and response.json()["error"]["type"] == "invalid_request_error"


def test_the_server_keeps_serving_after_bad_requests(client):
    for body in ({"question": ""}, {"k": -1}, {"question": "q", "model": "none"}):
        assert client.post("/v1/answer", json=body).status_code in (400, 404, 422)
    assert client.get("/health").json()["status"] == "ok"
    assert client.post("/v1/answer", json={"question": QUESTION, "max_new_tokens": 2}).status_code == 200


def test_a_model_error_is_a_400_for_its_request_alone(client, pipelines, monkeypatch):
    """A UserError raised by the model (a BGM bridge refusing a decoder, say) is that request's 400."""
    from jointrag.errors import UserError

    def refuse(*args, **kwargs):
        raise UserError("this model refuses")

    monkeypatch.setattr(pipelines[1], "answer", refuse)
    response = client.post("/v1/answer", json={"question": QUESTION, "model": "compare", "max_new_tokens": 2})
    assert response.status_code == 400 and response.json() == {"detail": "this model refuses"}
    assert client.post("/v1/answer", json={"question": QUESTION, "max_new_tokens": 2}).status_code == 200


# --- batching --------------------------------------------------------------------------------------


def test_concurrent_requests_run_as_batches(client, pipelines):
    before = client.get("/health").json()["batches"]["count"]
    questions = [q["question"] for q in QA] * 2
    with ThreadPoolExecutor(len(questions)) as pool:
        replies = list(pool.map(lambda q: client.post("/v1/answer", json={"question": q, "max_new_tokens": 3}).json(), questions))
    assert [r["answers"][0]["question"] for r in replies] == questions
    expected = {q: a.answer for q, a in zip(questions, pipelines[0].answer(questions, max_new_tokens=3))}
    assert all(r["answers"][0]["answer"] == expected[r["answers"][0]["question"]] for r in replies)
    batches = client.get("/health").json()["batches"]
    assert batches["count"] - before < len(questions) and batches["largest"] > 1


def test_the_batcher_groups_by_key_and_keeps_each_requests_results():
    batcher = Batcher(window=0.1, max_batch=100)
    calls = []

    def double(items):
        calls.append(list(items))
        time.sleep(0.01)
        return [2 * x for x in items]

    try:
        blocker = batcher.call(lambda: time.sleep(0.2))  # holds the worker while the requests queue up
        futures = [batcher.submit("double", double, [i, i + 100]) for i in range(5)]
        negate = batcher.submit("negate", lambda items: [-x for x in items], [7])
        blocker.result(timeout=5)
        assert [f.result(timeout=5) for f in futures] == [[2 * i, 2 * i + 200] for i in range(5)]
        assert negate.result(timeout=5) == [-7]
        assert calls == [[i + offset for i in range(5) for offset in (0, 100)]]  # the five requests in one call
    finally:
        batcher.close()


def test_a_failing_request_fails_alone_in_its_batch():
    batcher = Batcher(window=0.1, max_batch=100)

    def strict(items):
        if any(x < 0 for x in items):
            raise ValueError(f"negative in {items}")
        return items

    try:
        blocker = batcher.call(lambda: time.sleep(0.2))
        good, bad = batcher.submit("k", strict, [1, 2]), batcher.submit("k", strict, [-1])
        blocker.result(timeout=5)
        assert good.result(timeout=5) == [1, 2]
        with pytest.raises(ValueError, match=r"negative in \[-1\]"):
            bad.result(timeout=5)
    finally:
        batcher.close()


def test_alone_a_request_waits_no_longer_than_the_window():
    batcher = Batcher(window=0.05, max_batch=100)
    try:
        started = time.perf_counter()
        assert batcher.submit("k", lambda items: items, [1]).result(timeout=5) == [1]
        assert time.perf_counter() - started < 1.0
        assert threading.active_count() >= 2
    finally:
        batcher.close()


# --- the command line --------------------------------------------------------------------------------


def test_serve_refuses_a_taken_port_and_a_missing_run(capsys, index_dir, tiny_dir, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_user_error(capsys, "serve", "--index", index_dir, "--generator", tiny_dir / "causal", "--port", port,
                          names=(f"--port {port}", "cannot listen there"))
    assert_user_error(capsys, "serve", "--index", index_dir, "--generator", tiny_dir / "causal", "--port", 0,
                      "--run", tmp_path / "nothing", names=("--run", "not a directory"))
    assert_user_error(capsys, "serve", "--index", tmp_path, names=(str(tmp_path), "not an index"))
