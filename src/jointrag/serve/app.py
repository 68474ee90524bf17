"""The HTTP server of `jointrag serve`: one process, the models loaded once, a page at `/`.

Endpoints (JSON in and out; errors are `{"detail": one line}` with a 4xx status, and the server keeps
serving):

- `GET /health`: the models served and the batches run so far.
- `POST /v1/retrieve` {question | questions, k}: the top-k passages of each question.
- `POST /v1/answer` {question | questions, k, contexts, decode, max_new_tokens, beams, stream, model}:
  answers with their passages (ids, titles, texts, scores, `used`) and timings. `stream: true` (one
  question) sends server-sent events: `token` events `{"text": piece}` as the answer is generated,
  then one `done` event with the whole answer, its passages and timings (or an `error` event). Only
  the top1 decoder streams token by token; other decoders and a BGM bridge send their answer as one
  `token` event.
- `POST /v1/chat/completions`: OpenAI's chat completions, answering the last user message with
  retrieval: `choices[0].message.content`, and the passages in an extra `passages` field; `stream:
  true` sends OpenAI's `chat.completion.chunk` events, the passages in the last, then `data: [DONE]`.
  `GET /v1/models` lists the models ("main", and "compare" with `--compare`).
- `GET /` the page (ask, see the answer stream in and the passages with the answer marked; two models
  side by side with `--compare`); `GET /runs` the run view: a run's curves (RUN/plots/*.png, `jointrag
  plot`) and predictions, filterable to the questions where two runs disagree, with their data from
  `GET /v1/runs`, `/v1/runs/plot` and `/v1/runs/predictions`. Only the runs given with `--run` are
  shown: the server reads no directory a request names.

Every model call runs in one worker thread (`batcher.Batcher`), and concurrent requests with the same
settings run as one batch. Requests are bounded (body size, questions, question length, k, tokens) and
checked by pydantic before any model runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from ..api import Answer, Hit, Pipeline, StreamedAnswer
from ..errors import UserError
from ..evaluation.evaluate import DECODERS
from ..io import jsonl_records
from ..metrics import normalize_answer
from .batcher import Batcher

MAX_BODY_BYTES = 256 * 1024
MAX_QUESTIONS = 64  # per request
MAX_QUESTION_CHARS = 4000
MAX_K = 100
MAX_NEW_TOKENS = 512
MAX_BEAMS = 8
MAX_MESSAGES = 200
PAGE = Path(__file__).with_name("page.html")
PREDICTIONS = ("predictions.jsonl", "eval/predictions.jsonl")  # where a run directory's evaluated predictions are looked for
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

log = logging.getLogger("jointrag.serve")

Question = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_QUESTION_CHARS)]


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: Question | None = None
    questions: list[Question] | None = Field(None, min_length=1, max_length=MAX_QUESTIONS)
    k: int = Field(5, ge=1, le=MAX_K)
    model: str = "main"

    @model_validator(mode="after")
    def one_of_question_and_questions(self):
        if (self.question is None) == (self.questions is None):
            raise ValueError("give either 'question' or 'questions'")
        return self

    @property
    def listed(self) -> list[str]:
        return [self.question] if self.question is not None else list(self.questions)


class AnswerRequest(RetrieveRequest):
    contexts: int = Field(1, ge=0, le=MAX_K)
    decode: str | None = None
    max_new_tokens: int = Field(16, ge=1, le=MAX_NEW_TOKENS)
    beams: int = Field(1, ge=1, le=MAX_BEAMS)
    stream: bool = False

    @field_validator("decode")
    @classmethod
    def known_decoder(cls, value):
        if value is not None and value not in DECODERS:
            raise ValueError(f"must be one of {', '.join(DECODERS)}")
        return value

    @model_validator(mode="after")
    def streams_one_question(self):
        if self.stream and self.questions is not None:
            raise ValueError("stream answers one 'question', not 'questions'")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: carried by clients, not needed here

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: the text ones
            return " ".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # temperature, top_p, ...: OpenAI clients send them; greedy answers ignore them

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    k: int = Field(5, ge=1, le=MAX_K)
    contexts: int = Field(1, ge=0, le=MAX_K)

    def question(self) -> str:
        """The last user message, the one answered (earlier turns are not retrieved for)."""
        users = [m.text().strip() for m in self.messages if m.role == "user"]
        if not users or not users[-1]:
            raise HTTPException(400, "messages: the last user message is missing or empty")
        if len(users[-1]) > MAX_QUESTION_CHARS:
            raise HTTPException(400, f"messages: the last user message is longer than {MAX_QUESTION_CHARS} characters")
        return users[-1]


class BodyLimit:
    """Refuse a request body larger than `limit` bytes with 413 before it is parsed: at once when its
    Content-Length says so, else (a chunked body) as soon as what arrived passes the limit."""

    class TooLarge(BaseException):
        """Not an Exception: FastAPI turns any Exception raised while it reads a body into a 400."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self.refuse(send)
        received, started = 0, False

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyLimit.TooLarge
            return message

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyLimit.TooLarge:
            if not started:
                await self.refuse(send)

    async def refuse(self, send) -> None:
        body = json.dumps({"detail": f"request body larger than {self.limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def sse(data: Any, event: str | None = None) -> str:
    return (f"event: {event}\n" if event else "") + f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def hit_dicts(hits: list[Hit]) -> list[dict]:
    return [asdict(h) for h in hits]


def streamed_events(stream: StreamedAnswer) -> Iterator[str]:
    """The SSE events of /v1/answer for a stream: `token`s, then `done` (or `error`)."""
    try:
        for piece in stream:
            yield sse({"text": piece}, "token")
    except UserError as error:
        yield sse({"detail": str(error)}, "error")
        return
    except Exception:
        log.exception("generation failed")
        yield sse({"detail": "generation failed; the server's log says why"}, "error")
        return
    yield sse(stream.to_dict(), "done")


def chat_chunk(reply: dict, delta: dict, finish: str | None = None, **extra) -> str:
    return sse({**reply, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})


def read_predictions(path: Path) -> dict[str, dict]:
    """The rows of an evaluated predictions file by id: question, answers, prediction, em, f1."""
    rows = {}
    with path.open(encoding="utf-8") as f:
        for line, record in jsonl_records(path, f, objects=True):
            if not isinstance(record.get("id"), str) or not isinstance(record.get("question"), str):
                raise UserError(f"{path}, line {line}: a predictions row needs a string 'id' and 'question'")
            rows[record["id"]] = {key: record.get(key) for key in ("question", "answers", "prediction", "em", "f1")}
    return rows


def disagree(a: dict, b: dict | None) -> bool:
    if b is None or a["prediction"] is None or b["prediction"] is None:
        return False
    return normalize_answer(a["prediction"]) != normalize_answer(b["prediction"])


class Runs:
    """The run directories given with `--run`, by the name they were given as."""

    def __init__(self, directories: list[str]):
        self.directories = {name: Path(name) for name in directories}
        missing = [name for name, path in self.directories.items() if not path.is_dir()]
        if missing:
            raise UserError(f"--run {missing[0]}: not a directory")

    def get(self, name: str) -> Path:
        if name not in self.directories:
            raise HTTPException(404, f"run {name!r} is not one this server was started with (--run)")
        return self.directories[name]

    def plots(self, name: str) -> list[str]:
        return sorted(p.name for p in (self.get(name) / "plots").glob("*.png"))

    def predictions(self, name: str) -> Path | None:
        return next((self.get(name) / p for p in PREDICTIONS if (self.get(name) / p).is_file()), None)

    def listing(self) -> list[dict]:
        return [{"name": name, "plots": self.plots(name),
                 "predictions": None if (p := self.predictions(name)) is None else str(p)} for name in self.directories]

    def rows(self, name: str, other: str | None) -> list[dict]:
        paths = [self.predictions(n) for n in (name, other) if n is not None]
        if any(p is None for p in paths):
            missing = name if paths[0] is None else other
            raise HTTPException(404, f"run {missing!r} has no {' or '.join(PREDICTIONS)}; write one with `jointrag eval --out`")
        a, b = (read_predictions(p) for p in paths) if other is not None else (read_predictions(paths[0]), {})
        return [{"id": i, **row, "other": b.get(i), "disagree": disagree(row, b.get(i))} for i, row in a.items()]


def create_app(main: Pipeline, *, compare: Pipeline | None = None, runs: list[str] = (), window: float = 0.015,
               max_batch: int = 16) -> FastAPI:
    """The app over `main` (and `compare`), both loaded now: a bad model fails here, not at the first request."""
    run_dirs = Runs(list(runs))
    models = {"main": main.load()} | ({"compare": compare.load()} if compare is not None else {})
    described = {name: pipeline.describe() for name, pipeline in models.items()}
    batcher = Batcher(window, max_batch)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        batcher.close()

    app = FastAPI(title="jointrag", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)

    def pipeline(name: str | None) -> Pipeline:
        if name not in models:
            raise HTTPException(404 if name else 400, f"model {name!r} is not served here; models: {', '.join(models)}")
        return models[name]

    async def answers(name: str, questions: list[str], **settings) -> list[Answer]:
        served = pipeline(name)
        key = ("answer", name, *sorted(settings.items()))
        return await asyncio.wrap_future(batcher.submit(key, lambda qs: served.answer(qs, **settings), questions))

    async def stream(name: str, question: str, **settings) -> StreamedAnswer | None:
        """A streamed answer, or None when the model cannot stream these settings (see `Pipeline.streams`)."""
        served = pipeline(name)
        if not served.streams(settings.get("decode")):
            return None
        return await asyncio.wrap_future(batcher.call(lambda: served.stream_answer(question, **settings, runner=batcher.call)))

    def error_body(request: Request, status: int, message: str) -> JSONResponse:
        if request.url.path.startswith("/v1/chat/"):  # OpenAI's shape, which its clients read
            return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}, status)
        return JSONResponse({"detail": message}, status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        parts = [f"{'.'.join(str(x) for x in e['loc'] if x != 'body') or 'body'}: {e['msg']}" for e in error.errors()]
        return error_body(request, 422, "; ".join(parts))

    @app.exception_handler(HTTPException)
    async def refused(request: Request, error: HTTPException):
        return error_body(request, error.status_code, str(error.detail))

    @app.exception_handler(UserError)
    async def user_error(request: Request, error: UserError):
        return error_body(request, 400, str(error))

    @app.get("/health")
    async def health():
        done = batcher.batches
        return {"status": "ok", "models": described, "runs": list(run_dirs.directories),
                "batches": {"count": len(done), "largest": max(done, default=0),
                            "mean": round(sum(done) / len(done), 2) if done else 0}}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "jointrag", **described[name]} for name in models]}

    @app.post("/v1/retrieve")
    async def retrieve(request: RetrieveRequest):
        served = pipeline(request.model)
        future = batcher.submit(("retrieve", request.model, request.k), lambda qs: served.retrieve(qs, request.k), request.listed)
        results = await asyncio.wrap_future(future)
        return {"results": [{"question": q, "passages": hit_dicts(hits)} for q, hits in zip(request.listed, results)]}

    @app.post("/v1/answer")
    async def answer(request: AnswerRequest):
        settings = dict(k=request.k, contexts=request.contexts, decode=request.decode, max_new_tokens=request.max_new_tokens)
        if request.stream:
            streamed = await stream(request.model, request.question, **settings) if request.beams == 1 else None
            if streamed is not None:
                return StreamingResponse(streamed_events(streamed), media_type="text/event-stream", headers=SSE_HEADERS)
            [whole] = await answers(request.model, request.listed, beams=request.beams, **settings)

            async def at_once() -> AsyncIterator[str]:
                yield sse({"text": whole.answer}, "token")
                yield sse(whole.to_dict(), "done")

            return StreamingResponse(at_once(), media_type="text/event-stream", headers=SSE_HEADERS)
        done = await answers(request.model, request.listed, beams=request.beams, **settings)
        return {"answers": [a.to_dict() for a in done]}

    @app.post("/v1/chat/completions")
    async def chat(request: ChatRequest):
        name = request.model or "main"
        question = request.question()
        settings = dict(k=request.k, contexts=request.contexts, max_new_tokens=request.max_completion_tokens or request.max_tokens or 16)
        reply = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        streamed = await stream(name, question, **settings) if request.stream else None
        if streamed is not None:
            def chunks() -> Iterator[str]:
                yield chat_chunk(reply, {"role": "assistant", "content": ""})
                try:
                    for piece in streamed:
                        yield chat_chunk(reply, {"content": piece})
                except Exception as error:
                    log.exception("generation failed")
                    yield sse({"error": {"message": str(error) if isinstance(error, UserError) else "generation failed",
                                         "type": "server_error"}})
                    return
                yield chat_chunk(reply, {}, "stop", passages=hit_dicts(streamed.passages), timings=streamed.timings)
                yield "data: [DONE]\n\n"

            return StreamingResponse(chunks(), media_type="text/event-stream", headers=SSE_HEADERS)
        [whole] = await answers(name, [question], **settings)
        if request.stream:  # a model that cannot stream: the whole answer in one chunk
            async def at_once() -> AsyncIterator[str]:
                yield chat_chunk(reply, {"role": "assistant", "content": whole.answer})
                yield chat_chunk(reply, {}, "stop", passages=hit_dicts(whole.passages), timings=whole.timings)
                yield "data: [DONE]\n\n"

            return StreamingResponse(at_once(), media_type="text/event-stream", headers=SSE_HEADERS)
        return {**reply, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": whole.answer}, "finish_reason": "stop"}],
                "passages": hit_dicts(whole.passages), "timings": whole.timings}

    @app.get("/", response_class=HTMLResponse)
    @app.get("/runs", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text(encoding="utf-8")

    @app.get("/v1/runs")
    async def list_runs():
        return {"runs": run_dirs.listing()}

    @app.get("/v1/runs/plot")
    async def plot(run: str, file: str):
        if file not in run_dirs.plots(run):
            raise HTTPException(404, f"run {run!r} has no plot {file!r}")
        return FileResponse(run_dirs.get(run) / "plots" / file, media_type="image/png")

    @app.get("/v1/runs/predictions")
    async def predictions(run: str, other: str | None = None):
        return {"run": run, "other": other, "rows": run_dirs.rows(run, other)}

    return app


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), so that a taken port is one clear error before the server starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot listen there ({error.strerror or error})") from None
    return sock


def serve(main: Pipeline, *, compare: Pipeline | None = None, host: str = "127.0.0.1", port: int = 8000, runs: list[str] = (),
          window: float = 0.015, max_batch: int = 16, json_output: bool = False) -> None:
    """Load the models, listen on host:port and serve until interrupted (`jointrag serve`)."""
    import uvicorn

    sock = listening_socket(host, port)
    app = create_app(main, compare=compare, runs=runs, window=window, max_batch=max_batch)
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://{'[' + bound_host + ']' if ':' in bound_host else bound_host}:{bound_port}/"
    print(json.dumps({"url": url}) if json_output else f"jointrag: serving on {url} (Ctrl-C stops)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)).run(sockets=[sock])
    print("jointrag: stopped", file=sys.stderr)
