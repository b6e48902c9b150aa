"""The FastAPI app: OpenAI-compatible chat completions over the `Engine`, /health, /metrics, the demo page.

Request handling stays off the scheduler thread: the prompt is built (images decoded,
ids encoded, limits checked) in a worker thread, the request is queued on the engine,
and its events come back through an asyncio queue. A client that goes away (streamed or
not) marks its request cancelled, and the scheduler drops its row before the next step.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vrwkv_core.infer import GenerationConfig
from vrwkv_core.infer.sampling import DOUBLE_NEWLINE, END_OF_TEXT, IMAGE_TOKEN_ID
from vrwkv_core.serve import schemas as S
from vrwkv_core.serve.engine import Delta, Engine, EngineRequest, Failed, Finished, QueueFull, ShuttingDown, answer_text
from vrwkv_core.serve.errors import ApiError, error_body
from vrwkv_core.serve.images import load_image_url
from vrwkv_core.serve.metrics import Metrics
from vrwkv_core.serve.prompt import build_prompt

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_TOKENS = 1024
"""Answer length when a request sets none (an RNN has no context to fill up)."""


@dataclass
class ServeSettings:
    model_name: str
    api_key: str | None = None
    image_root: Path | None = None
    max_image_bytes: int = 20 * 2**20
    max_context: int = 8192
    prefill_pad: bool = True
    """Pad the first prefill of a conversation as `chat` does (the model release's pad)."""


def create_app(engine: Engine, settings: ServeSettings, metrics: Metrics | None = None) -> FastAPI:
    """The app serving `engine` (see the module docstring)."""
    metrics = metrics or engine.metrics or Metrics()
    created = int(time.time())
    app = FastAPI(title="vrwkv serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(given.encode(), settings.api_key.encode()):
            raise ApiError(401, "incorrect or missing API key (send Authorization: Bearer KEY)", "invalid_api_key")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        message = f"{param}: {msg}" if param else ("the body is not valid JSON" if "json" in msg.lower() else msg)
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_request"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        message = f"no route {request.method} {request.url.path}" if err.status_code in (404, 405) else str(err.detail)
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(message, kind, None, code), status_code=err.status_code)

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, "auth": settings.api_key is not None,
                "active_rows": engine.active_rows, "queue_depth": engine.queue_depth}  # fmt: skip

    @app.get("/metrics")
    async def prom() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict[str, Any]:
        return S.dump(S.ModelList(data=[S.ModelCard(id=settings.model_name, created=created)]))

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: S.ChatCompletionRequest, request: Request) -> Any:
        try:
            req, events, n_prompt = await _queue_request(body)
        except ApiError:
            metrics.requests.labels("rejected").inc()
            raise
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(cid, now, req, events, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        watcher = asyncio.create_task(_cancel_on_disconnect(request, req))
        try:
            while True:
                event = await events.get()
                if isinstance(event, Failed):
                    metrics.requests.labels("failed").inc()
                    raise ApiError(event.status, event.message, event.code)
                if isinstance(event, Finished):
                    break
        finally:
            watcher.cancel()
            req.cancelled = True  # no-op once finished; frees the row if this handler is cancelled
        metrics.requests.labels("ok").inc()
        out = S.ChatCompletion(id=cid, created=now, model=settings.model_name, usage=_usage(event),
                               choices=[S.Choice(message=S.AssistantMessage(content=answer_text(event.text)),
                                                 finish_reason=event.reason)])  # fmt: skip
        return S.dump(out)

    async def _queue_request(body: S.ChatCompletionRequest) -> tuple[EngineRequest, asyncio.Queue, int]:
        if body.model != settings.model_name:
            raise ApiError(404, f"the model {body.model!r} does not exist: this server serves {settings.model_name!r}",
                           "model_not_found", "model")  # fmt: skip
        if body.n != 1:
            raise ApiError(400, f"n must be 1 (got {body.n}): one answer per request", "invalid_value", "n")
        config = _config(body)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        def load(url: str) -> Any:
            return load_image_url(url, settings.image_root, settings.max_image_bytes)

        prompt = await run_in_threadpool(build_prompt, body.messages, engine.tok, engine.model, load, engine.memo,
                                           settings.prefill_pad)
        if len(prompt.ids) > settings.max_context:
            n_img = sum(1 for t in prompt.ids if t == IMAGE_TOKEN_ID)
            raise ApiError(400, f"the prompt is {len(prompt.ids)} tokens ({n_img} of them image placeholders), more than "
                           f"the {settings.max_context} this server takes (--max-context)", "context_length_exceeded",
                           "messages")  # fmt: skip
        req = EngineRequest(prompt.ids, config, emit, prompt.images, prompt.boundaries, min_tokens=body.min_tokens)
        try:
            engine.submit(req)
        except QueueFull as err:
            raise ApiError(429, str(err), "queue_full") from None
        except ShuttingDown as err:
            raise ApiError(503, str(err), "server_shutting_down") from None
        return req, events, len(prompt.ids)

    async def _stream(cid: str, now: int, req: EngineRequest, events: asyncio.Queue, include_usage: bool) -> AsyncIterator[str]:
        def chunk(delta: S.Delta, finish: str | None = None, usage: S.Usage | None = None, choices: bool = True) -> str:
            c = S.ChatCompletionChunk(id=cid, created=now, model=settings.model_name, usage=usage,
                                      choices=[S.ChunkChoice(delta=delta, finish_reason=finish)] if choices else [])  # fmt: skip
            return f"data: {json.dumps(S.dump(c), ensure_ascii=False)}\n\n"

        started = False  # the answer's leading space (after "Assistant:") is not shown
        try:
            yield chunk(S.Delta(role="assistant", content=""))
            while True:
                event = await events.get()
                if isinstance(event, Delta):
                    text = event.text if started else event.text.lstrip()
                    if text:
                        started = True
                        yield chunk(S.Delta(content=text))
                elif isinstance(event, Failed):
                    metrics.requests.labels("failed").inc()
                    err = error_body(event.message, "server_error", None, event.code)
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                else:
                    metrics.requests.labels("ok").inc()
                    yield chunk(S.Delta(), event.reason)
                    if include_usage:
                        yield chunk(S.Delta(), usage=_usage(event), choices=False)
                    break
            yield "data: [DONE]\n\n"
        finally:
            req.cancelled = True  # the client went away (or the answer ended): free the row

    return app


async def _cancel_on_disconnect(request: Request, req: EngineRequest) -> None:
    """Cancels `req` when its client goes away while it waits for a non-streamed answer (the body
    is read, so the next ASGI message is the disconnect); its row leaves before the next step."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    req.cancelled = True


def _config(body: S.ChatCompletionRequest) -> GenerationConfig:
    """The request's sampling knobs (OpenAI defaults: temperature 1, top_p 1)."""
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not s for s in stops):
        raise ApiError(400, "stop strings must not be empty", "invalid_value", "stop")
    max_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS
    return GenerationConfig(
        max_new_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(body.top_k, 0),
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        stop_tokens=() if body.ignore_eos else (DOUBLE_NEWLINE, END_OF_TEXT),
        stop_strings=tuple(stops),
        seed=body.seed,
    )


def _usage(event: Finished) -> S.Usage:
    return S.Usage(prompt_tokens=event.n_prompt, completion_tokens=event.n_completion,
                   total_tokens=event.n_prompt + event.n_completion,
                   prompt_tokens_details=S.PromptTokensDetails(cached_tokens=event.n_cached))  # fmt: skip


__all__ = ["DEFAULT_MAX_TOKENS", "ServeSettings", "create_app"]
