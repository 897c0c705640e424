"""The HTTP layer: an OpenAI-compatible API over one ModelService (FastAPI on uvicorn).

    GET  /v1/models                 the one model this server runs
    POST /v1/chat/completions       chat (the bundle's template), SSE with "stream": true
    POST /v1/completions            text or token-id prompts, SSE with "stream": true
    GET  /health                    200 {"status": "ok"} while serving (503 while draining)
    GET  /metrics                   Prometheus text

Errors are OpenAI's JSON ({"error": {"message", "type", "param", "code"}}) with a 4xx naming the field
for a malformed request, 401 for a missing or wrong API key, 404 for an unknown model, 429 when the
scheduler's queue is full.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from ardeploy.runtime.log import log

from .metrics import CONTENT_TYPE_LATEST, ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, describe_validation_error, error_body, pick_error
from .service import FINISH_REASONS, ApiError, Job, ModelService, result_of

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(service: ModelService, api_key: str | None = None, on_shutdown=None) -> FastAPI:
    """The ASGI app. on_shutdown: called once when the server stops (after in-flight requests ended)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.draining = True
        if on_shutdown is not None:
            on_shutdown()

    app = FastAPI(title="ardeploy", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    metrics = ServerMetrics(service.scheduler)
    app.state.service, app.state.metrics = service, metrics

    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)

    @app.get("/health")
    async def health():
        if service.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok", "model": service.model_name, **service.scheduler.stats()}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(service)]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if name != service.model_name:
            return _error(ApiError(404, f"The model '{name}' does not exist", "model", code="model_not_found"))
        return _model_card(service)

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        return await _complete(request, ChatCompletionRequest, "chat", service, metrics)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await _complete(request, CompletionRequest, "completions", service, metrics)

    @app.exception_handler(404)
    async def not_found(request, exc):
        return _error(ApiError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    @app.exception_handler(405)
    async def wrong_method(request, exc):
        return _error(ApiError(405, f"{request.method} is not allowed on {request.url.path}"))

    return app


class ApiKeyMiddleware:
    """Plain ASGI (streams and disconnects pass through untouched): /v1/ paths need `Authorization: Bearer KEY`;
    /health and /metrics stay open for probes and scrapers."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                what = "missing" if not given else "incorrect"
                response = _error(ApiError(401, f"{what} API key: send 'Authorization: Bearer KEY'",
                                           code="invalid_api_key"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _model_card(service: ModelService) -> dict:
    return {"id": service.model_name, "object": "model", "created": service.created, "owned_by": "ardeploy",
            "max_model_len": service.max_seq}


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status)


async def _complete(request: HttpRequest, model, endpoint: str, service: ModelService, metrics: ServerMetrics):
    received = time.perf_counter()
    try:
        body = model.model_validate_json(await request.body())
        # tokenizing and compiling a schema take milliseconds to a few hundred: off the event loop
        job = await asyncio.to_thread(service.admit, body, received)
    except ValidationError as e:
        message, param = describe_validation_error(pick_error(e.errors(include_url=False)))
        metrics.requests.labels(endpoint, "client_error").inc()
        return _error(ApiError(400, message, param))
    except ApiError as e:
        metrics.requests.labels(endpoint, "queue_full" if e.status == 429 else "client_error").inc()
        return _error(e)
    metrics.prompt_tokens.inc(job.prompt_tokens)
    shape = ChatShape(service, job) if endpoint == "chat" else CompletionShape(service, job)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(request, service, metrics, endpoint, job, shape, include_usage),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    return await _whole(request, service, metrics, endpoint, job, shape)


async def _whole(request, service, metrics, endpoint, job: Job, shape) -> Response:
    """Wait for the whole answer; a client that hangs up meanwhile cancels its request."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        async for _ in service.events(job):
            pass
    except Exception as e:                           # noqa: BLE001 - the engine failed this request
        return _failed(metrics, endpoint, e)
    finally:
        watcher.cancel()
    result = result_of(job)
    _record(metrics, endpoint, job, result)
    return JSONResponse(shape.whole(result))


async def _cancel_on_disconnect(request: HttpRequest, job: Job) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.handle.cancel()
            return


async def _sse(request, service, metrics, endpoint, job: Job, shape, include_usage: bool):
    """Server-sent events: one chunk per printable piece (pieces that arrived together: one chunk), the
    finish reason, [DONE]. If the client goes away its request is cancelled: by the disconnect watcher
    (also while the request still waits for a row), or when the next piece cannot be sent (the generator
    is closed and `service.events` cancels)."""
    finished = False
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        yield _data(shape.first())
        try:
            async for events in service.events(job):
                text = "".join(event.text for event in events)
                if text:
                    yield _data(shape.piece(text))
        except Exception as e:                       # noqa: BLE001
            finished = True
            _failed(metrics, endpoint, e)
            yield _data(error_body(f"generation failed: {e}", "server_error"))
            return
        result = result_of(job)
        finished = True
        _record(metrics, endpoint, job, result)
        yield _data(shape.last(result))
        if include_usage:
            yield _data(shape.usage_chunk(result))
        yield "data: [DONE]\n\n"
    finally:
        watcher.cancel()
        if not finished:                             # the client left: count the request once it has stopped
            threading.Thread(target=_record_when_done, args=(metrics, endpoint, job), daemon=True).start()


def _record_when_done(metrics: ServerMetrics, endpoint: str, job: Job) -> None:
    if job.handle.wait(600):
        _record(metrics, endpoint, job, result_of(job))


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _record(metrics: ServerMetrics, endpoint: str, job: Job, result) -> None:
    outcome = "cancelled" if result.stop_reason == "cancelled" else "ok"
    metrics.requests.labels(endpoint, outcome).inc()
    first = None if job.first_token_at is None else job.first_token_at - job.received
    metrics.finished(result, first, time.perf_counter() - job.received)


def _failed(metrics: ServerMetrics, endpoint: str, e: BaseException) -> JSONResponse:
    log.warning(f"{endpoint}: generation failed: {type(e).__name__}: {e}")
    metrics.requests.labels(endpoint, "server_error").inc()
    return _error(ApiError(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error"))


# -- answer shapes ----------------------------------------------------------------------------------
class Shape:
    def __init__(self, service: ModelService, job: Job):
        self.service, self.job = service, job
        self.created = int(time.time())

    def head(self, obj: str) -> dict:
        return {"id": self.job.id, "object": obj, "created": self.created, "model": self.service.model_name}

    def usage(self, result) -> dict:
        done = len(result.token_ids)
        return {"prompt_tokens": self.job.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.job.prompt_tokens + done}

    def usage_chunk(self, result) -> dict:
        return {**self.head(self.chunk_object), "choices": [], "usage": self.usage(result)}


class ChatShape(Shape):
    chunk_object = "chat.completion.chunk"

    def whole(self, result) -> dict:
        message = {"role": "assistant", "content": result.text or ""}
        return {**self.head("chat.completion"), "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": FINISH_REASONS[result.stop_reason],
             "token_ids": result.token_ids}],
            "usage": self.usage(result)}

    def first(self) -> dict:
        return self._chunk({"role": "assistant", "content": ""}, None)

    def piece(self, text: str) -> dict:
        return self._chunk({"content": text}, None)

    def last(self, result) -> dict:
        return self._chunk({}, FINISH_REASONS[result.stop_reason])

    def _chunk(self, delta: dict, finish) -> dict:
        return {**self.head(self.chunk_object), "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


class CompletionShape(Shape):
    chunk_object = "text_completion"

    def whole(self, result) -> dict:
        return {**self.head("text_completion"), "choices": [
            {"index": 0, "text": result.text or "", "logprobs": None,
             "finish_reason": FINISH_REASONS[result.stop_reason], "token_ids": result.token_ids}],
            "usage": self.usage(result)}

    def first(self) -> dict:
        return self._chunk("", None)

    def piece(self, text: str) -> dict:
        return self._chunk(text, None)

    def last(self, result) -> dict:
        return self._chunk("", FINISH_REASONS[result.stop_reason])

    def _chunk(self, text: str, finish) -> dict:
        return {**self.head(self.chunk_object), "choices": [
            {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
