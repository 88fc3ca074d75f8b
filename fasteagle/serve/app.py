"""The HTTP API (FastAPI): OpenAI's /v1/chat/completions, /v1/completions and /v1/models, plus /health and /metrics.

Handlers validate and tokenize a request (protocol.py), queue it for the one engine thread (worker.py), then either
stream its deltas as server-sent events or collect them into one response. Nothing invalid reaches the engine.
"""
import asyncio
import json
import secrets
import time
import uuid

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from fasteagle.serve.metrics import Metrics
from fasteagle.serve.protocol import (APIError, ChatRequest, CompletionRequest, chat_ids, completion_ids,
                                      generation, parse)
from fasteagle.serve.worker import Delta, Done, Failed, Job, QueueFull

PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
POLL_S = 0.5  # how often a waiting handler checks that its client is still there


class CountRequests:
    """ASGI middleware: every response counted by path and status (a plain ASGI wrapper leaves streaming alone)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            path = scope["path"] if scope["path"] in PATHS else "other"
            self.metrics.requests.labels(path, str(status)).inc()


class Kind:
    """How one endpoint's responses look: chat (message / delta) or completion (text)."""

    def __init__(self, chat: bool):
        self.chat = chat
        self.prefix, self.object = ("chatcmpl-", "chat.completion") if chat else ("cmpl-", "text_completion")

    def choice(self, text: str | None, finish: str | None, stream: bool) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        body = ({} if text is None else {"content": text}) if stream else {"role": "assistant", "content": text}
        return {"index": 0, "delta" if stream else "message": body, "finish_reason": finish, "logprobs": None}

    def envelope(self, rid: str, model: str, stream: bool, **fields) -> dict:
        obj = self.object + (".chunk" if stream and self.chat else "")
        return {"id": rid, "object": obj, "created": int(time.time()), "model": model, **fields}


def usage(done: Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def stats(done: Done) -> dict:
    """The response's extension: tau and rounds."""
    return {"accepted_tokens_per_round": done.tau, "rounds": done.rounds}


def create_app(worker, model_name: str, api_key: str | None = None, request_timeout: float = 600.0) -> FastAPI:
    metrics = Metrics()
    app = FastAPI(title="fasteagle", docs_url=None, redoc_url=None)
    app.add_middleware(CountRequests, metrics=metrics)
    worker.on_done = metrics.generation  # every generation counted, also those whose client has gone

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    def check_key(request: Request):
        given = request.headers.get("authorization", "")
        if api_key and not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or incorrect API key (Authorization: Bearer KEY)", code="invalid_api_key")

    @app.get("/health")
    async def health():
        if worker.error is not None:
            return JSONResponse({"status": "error", "message": str(worker.error)}, status_code=503)
        return JSONResponse({"status": "ok" if worker.ready.is_set() else "loading"},
                            status_code=200 if worker.ready.is_set() else 503)

    @app.get("/metrics")
    async def prometheus():
        metrics.queued.set(worker.jobs.qsize())
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "fasteagle"}]}

    @v1.post("/chat/completions")
    async def chat(request: Request):
        req = parse(ChatRequest, await request.body())
        return await answer(request, req, Kind(chat=True), lambda m: chat_ids(req, m.tok))

    @v1.post("/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await request.body())
        return await answer(request, req, Kind(chat=False),
                            lambda m: completion_ids(req, m.tok, m.engine.target.args.vocab_size))

    async def answer(request: Request, req, kind: Kind, prompt_ids):
        if req.model != model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        if not worker.ready.is_set():
            raise APIError(503, "the model is still loading" if worker.error is None else
                           f"the model failed to load: {worker.error}", type="server_error")
        m = worker.loaded
        gen = generation(req, prompt_ids(m), m.max_seq_len, kind.chat)
        job = Job(gen, asyncio.get_running_loop(), time.monotonic() + request_timeout)
        try:
            worker.submit(job)
        except QueueFull:
            raise APIError(429, "the server is busy (its request queue is full); retry later",
                           type="rate_limit_exceeded", code="rate_limit_exceeded") from None
        rid = kind.prefix + uuid.uuid4().hex
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream(request, job, kind, rid, include_usage), media_type="text/event-stream")
        try:
            return await collect(request, job, kind, rid)
        finally:
            job.cancelled.set()  # a no-op once the job is done; otherwise the engine stops at its next round

    async def events(request: Request, job: Job):
        """The job's events until its Done / Failed, or until the client goes away (checked every POLL_S)."""
        checked = time.monotonic()
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), POLL_S)
            except asyncio.TimeoutError:
                event = None
            if time.monotonic() - checked >= POLL_S:
                if await request.is_disconnected():
                    return
                checked = time.monotonic()
            if event is None:
                continue
            yield event
            if isinstance(event, (Done, Failed)):
                return

    async def collect(request: Request, job: Job, kind: Kind, rid: str):
        text = []
        async for event in events(request, job):
            if isinstance(event, Delta):
                text.append(event.text)
            elif isinstance(event, Failed):
                raise APIError(event.status, event.message, type="server_error")
            elif event.finish_reason == "timeout":
                raise APIError(504, f"the request timed out after {request_timeout:g}s", type="server_error")
            else:
                return kind.envelope(rid, model_name, False, choices=[kind.choice("".join(text), event.finish_reason,
                                                                                  False)],
                                     usage=usage(event), fasteagle=stats(event))
        return Response(status_code=499)  # the client has gone: nobody reads this

    async def stream(request: Request, job: Job, kind: Kind, rid: str, include_usage: bool):
        def sse(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        def chunk(text, finish=None, **extra):
            return sse(kind.envelope(rid, model_name, True, choices=[kind.choice(text, finish, True)], **extra))

        try:
            if kind.chat:
                yield sse(kind.envelope(rid, model_name, True, choices=[
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                     "logprobs": None}]))
            async for event in events(request, job):
                if isinstance(event, Delta):
                    yield chunk(event.text)
                elif isinstance(event, Failed) or event.finish_reason == "timeout":
                    message = event.message if isinstance(event, Failed) else \
                        f"the request timed out after {request_timeout:g}s"
                    yield sse(APIError(getattr(event, "status", 504), message, type="server_error").body())
                else:
                    yield chunk(None, event.finish_reason, fasteagle=stats(event))
                    if include_usage:
                        yield sse(kind.envelope(rid, model_name, True, choices=[], usage=usage(event)))
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the response is closed mid-stream) or the job ended
            job.cancelled.set()

    app.include_router(v1)
    return app
