"""The OpenAI-compatible HTTP server: routes, the API key, OpenAI error objects, server-sent events, and
aborting the requests of a client that goes away."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging

import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engine.llm_engine import LLMEngine
from . import chat, completions
from .async_engine import AsyncEngine, EngineDeadError
from .protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from .serving import SSE_DONE, BadRequest, OpenAIServing, error_body, sse

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks whether its client is still there


def build_app(engine: LLMEngine, model_names: list[str], api_key: str | None = None,
              reasoning_parser: bool = True, model_root: str | None = None) -> FastAPI:
    """model_names: the names requests may use (the first is the one responses carry)."""
    if engine.tokenizer is None:
        raise ValueError("this model has no tokenizer (tokenizer.json): the server needs one to read and write text")
    async_engine = AsyncEngine(engine)
    serving = OpenAIServing(async_engine, model_names, reasoning_parser)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async_engine.start()
        try:
            yield
        finally:
            async_engine.shutdown()

    app = FastAPI(title="minimax-m1", version=__version__, lifespan=lifespan)
    app.state.engine, app.state.serving = async_engine, serving
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if async_engine.is_healthy else 503)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(async_engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def card(name: str) -> ModelCard:
        return ModelCard(id=name, root=model_root or name, max_model_len=engine.max_model_len)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[card(n) for n in model_names])

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str):
        if model not in model_names:
            return JSONResponse(error_body(f"the model {model!r} does not exist", "invalid_request_error", "model",
                                           "model_not_found"), status_code=404)
        return card(model)

    @app.post("/v1/completions")
    async def create_completion(request: Request):
        return await _respond(request, serving, await _body(request, CompletionRequest), completions)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: Request):
        return await _respond(request, serving, await _body(request, ChatCompletionRequest), chat)

    return app


async def _body(request: Request, model: type[pydantic.BaseModel]):
    """The JSON body as `model`, whatever the Content-Type says (curl -d sends a form type); BadRequest if not."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as e:
        raise _invalid(e.errors()) from e


async def _respond(request: Request, serving: OpenAIServing, body, endpoint) -> Response:
    """endpoint: the completions or chat module (prepare, response, stream)."""
    requests = endpoint.prepare(serving, body)  # BadRequest -> 400 before anything runs
    if not serving.engine.is_healthy:
        raise EngineDeadError("the engine is not running")
    if body.stream:
        return AbortingStreamingResponse(_events(endpoint.stream(serving, body, requests)),
                                         media_type="text/event-stream")
    try:
        result = await _unless_disconnected(request, endpoint.response(serving, body, requests))
    except ValueError as e:  # the engine refused the request after all
        raise BadRequest(str(e)) from e
    return Response(status_code=499) if result is None else JSONResponse(result.model_dump())


async def _events(events):
    """Server-sent events, ending with an error event rather than a cut connection when something fails
    after the response has started."""
    try:
        async for event in events:
            yield event
    except EngineDeadError as e:
        yield sse(error_body(f"the engine failed: {e}", "server_error", code="engine_dead"))
        yield SSE_DONE
    except ValueError as e:
        yield sse(error_body(str(e), "invalid_request_error"))
        yield SSE_DONE
    except Exception as e:
        logger.exception("a streamed request failed")
        yield sse(error_body(f"internal server error: {type(e).__name__}: {e}", "server_error"))
        yield SSE_DONE
    finally:
        await events.aclose()  # aborts the engine requests if the stream ended early


class AbortingStreamingResponse(StreamingResponse):
    """A streaming response that always closes its event generator, so a client that leaves mid-stream
    aborts its requests at once, whichever way the server noticed (a cancelled send or a disconnect message)."""

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _unless_disconnected(request: Request, coro):
    """Await coro, cancelling it (which aborts its engine requests) if the client disconnects first;
    None in that case."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                logger.info("client disconnected: aborting %s", request.url.path)
                return None
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class ApiKeyMiddleware:
    """With --api-key, every /v1 route needs `Authorization: Bearer <key>`; /health and /metrics stay open."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = error_body("missing or incorrect API key: send 'Authorization: Bearer <key>'",
                                  "authentication_error", code="invalid_api_key")
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BadRequest)
    async def bad_request(_, e: BadRequest):
        return JSONResponse(error_body(e.message, "invalid_request_error", e.param, e.code), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_, e: RequestValidationError):  # FastAPI answers 422; OpenAI and vLLM say 400
        return await bad_request(_, _invalid(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_, e: EngineDeadError):
        return JSONResponse(error_body(f"the engine failed: {e}", "server_error", code="engine_dead"),
                            status_code=503)

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        return JSONResponse(error_body(f"internal server error: {type(e).__name__}: {e}", "server_error"),
                            status_code=500)


def _invalid(errors: list) -> BadRequest:
    """A BadRequest naming the first invalid field, from pydantic's errors."""
    err = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _param(err.get("loc", ()))
    if sum(_param(x.get("loc", ())) == param for x in errors) > 1:  # every form of a union field failed
        message = f"{param}: {_short(err.get('input'))} is not an accepted value"
    else:
        message = f"{param}: {err['msg']}" if param else f"the request body: {err['msg']}"
    return BadRequest(message, param)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc) -> str | None:
    """A validation error's location as OpenAI names a parameter ("messages[0].role"), without the
    union-branch tags pydantic adds ("prompt.list[int]" -> "prompt")."""
    param = ""
    for x in loc:
        if isinstance(x, int):
            param += f"[{x}]"
        elif x != "body":
            if x in _TYPE_TAGS or "[" in x or "-" in x:
                break
            param += f".{x}" if param else x
    return param or None


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def run_server(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)
