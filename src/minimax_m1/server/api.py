"""The OpenAI-compatible HTTP server: routes, OpenAI error objects, server-sent events, and aborting the
requests of a client that goes away. Bodies are read under a size limit and parsed, validated and
tokenised off the event loop (body.py, serving.run_blocking); the middlewares (middleware.py) check the
Host, the API key and the Content-Type first."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engine.llm_engine import LLMEngine
from . import chat, completions, tokens
from .args import ServerArgs
from .async_engine import AsyncEngine, EngineDeadError, EngineUnavailable, RequestFailedError, ShuttingDownError
from .body import PayloadTooLarge, parse_json_object, read_body
from .middleware import CatchAll, ApiKey, HostCheck, RequireJson, error_response
from .openapi import GET_RESPONSES, post_responses, request_body, with_request_schemas
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from .serving import SSE_DONE, BadRequest, OpenAIServing, error_body, sse

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks whether its client is still there


def build_app(engine: LLMEngine | AsyncEngine, model_names: list[str], args: ServerArgs | None = None,
              **overrides) -> FastAPI:
    """engine: an AsyncEngine over an engine-core process (`AsyncEngine.in_process`, what `serve` runs), or
    an LLMEngine to run in a core thread of this process. model_names: the names requests may use (the
    first is the one responses carry). `overrides` are ServerArgs fields (api_key=..., max_request_bytes=...)."""
    if engine.tokenizer is None:
        raise ValueError("this model has no tokenizer (tokenizer.json): the server needs one to read and write text")
    args = dataclasses.replace(args or ServerArgs(), **overrides)
    async_engine = (engine if isinstance(engine, AsyncEngine) else
                    AsyncEngine.in_thread(engine, max_request_seconds=args.max_request_seconds))
    engine = async_engine.engine  # the limits (max_model_len) the core reported
    serving = OpenAIServing(async_engine, model_names, args.reasoning_parser, args.max_num_seqs_per_request,
                            args.tool_call_parser)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async_engine.start()
        try:
            yield
        finally:
            async_engine.shutdown()
            serving.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="minimax-m1", version=__version__, lifespan=lifespan)
    app.state.engine, app.state.serving, app.state.args = async_engine, serving, args
    # the first added is the innermost
    app.add_middleware(CatchAll)
    app.add_middleware(RequireJson)
    if args.api_key:
        app.add_middleware(ApiKey, api_key=args.api_key)
    if args.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=args.allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    names = args.host_names()
    if names is not None:
        app.add_middleware(HostCheck, names=names)
    _add_error_handlers(app)

    @app.get("/health", response_class=Response, responses={200: {"description": "Serving"}, 503: GET_RESPONSES[503]})
    async def health() -> Response:
        """200 while the server takes requests; 503 when the engine failed or the server is shutting down."""
        return Response(status_code=200 if async_engine.accepting else 503)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        return Response(async_engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def card(name: str) -> ModelCard:
        return ModelCard(id=name, root=args.model_root or name, max_model_len=engine.max_model_len)

    @app.get("/v1/models", responses={401: GET_RESPONSES[401]})
    async def list_models() -> ModelList:
        return ModelList(data=[card(n) for n in model_names])

    @app.get("/v1/models/{model:path}", responses={401: GET_RESPONSES[401], 404: GET_RESPONSES[404]})
    async def get_model(model: str) -> ModelCard:
        if model not in model_names:
            return JSONResponse(error_body(f"the model {model!r} does not exist", "invalid_request_error", "model",
                                           "model_not_found"), status_code=404)
        return card(model)

    @app.post("/v1/completions", responses=post_responses(CompletionResponse),
              openapi_extra=request_body(CompletionRequest))
    async def create_completion(request: Request):
        body = await _body(request, serving, args, CompletionRequest)
        return await _respond(request, serving, body, completions)

    @app.post("/v1/chat/completions", responses=post_responses(ChatCompletionResponse),
              openapi_extra=request_body(ChatCompletionRequest))
    async def create_chat_completion(request: Request):
        body = await _body(request, serving, args, ChatCompletionRequest)
        return await _respond(request, serving, body, chat)

    @app.post("/tokenize", responses=post_responses(TokenizeResponse), openapi_extra=request_body(TokenizeRequest))
    async def tokenize(request: Request) -> TokenizeResponse:
        """vLLM's: a prompt (or chat messages through the chat template) as token ids."""
        body = await _body(request, serving, args, TokenizeRequest)
        return await serving.run_blocking(tokens.tokenize, serving, body)

    @app.post("/detokenize", responses=post_responses(DetokenizeResponse),
              openapi_extra=request_body(DetokenizeRequest))
    async def detokenize(request: Request) -> DetokenizeResponse:
        body = await _body(request, serving, args, DetokenizeRequest)
        return await serving.run_blocking(tokens.detokenize, serving, body)

    with_request_schemas(app, [CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest])
    return app


async def _body(request: Request, serving: OpenAIServing, args: ServerArgs, model: type[pydantic.BaseModel]):
    """The JSON body as `model` (size-limited, parsed and validated off the event loop); BadRequest if not."""
    raw = await read_body(request, args.max_request_bytes)
    return await serving.run_blocking(_validate, raw, model)


def _validate(raw: bytes, model: type[pydantic.BaseModel]):
    try:
        return model.model_validate(parse_json_object(raw))
    except pydantic.ValidationError as e:
        raise _invalid(e.errors()) from e


async def _respond(request: Request, serving: OpenAIServing, body, endpoint) -> Response:
    """endpoint: the completions or chat module (prepare, response, stream)."""
    _check_accepting(serving.engine)
    requests = await serving.run_blocking(endpoint.prepare, serving, body)  # BadRequest -> 400 before anything runs
    _check_accepting(serving.engine)
    if body.stream:
        return AbortingStreamingResponse(_events(endpoint.stream(serving, body, requests)),
                                         media_type="text/event-stream")
    try:
        result = await _unless_disconnected(request, endpoint.response(serving, body, requests))
    except ValueError as e:  # the engine refused the request after all
        raise BadRequest(str(e)) from e
    return Response(status_code=499) if result is None else JSONResponse(result.model_dump())


def _check_accepting(engine: AsyncEngine) -> None:
    if engine.draining:
        raise ShuttingDownError("the server is shutting down and takes no new requests")
    if not engine.is_healthy:
        raise EngineDeadError(f"the engine is not running: {engine.error!r}")


async def _events(events):
    """Server-sent events, ending with an error event rather than a cut connection when something fails
    after the response has started."""
    try:
        async for event in events:
            yield event
    except EngineUnavailable as e:
        yield sse(error_body(f"the engine is unavailable: {e}", "server_error", code=e.code))
        yield SSE_DONE
    except RequestFailedError as e:
        yield sse(error_body(str(e), "server_error", code="request_failed"))
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


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BadRequest)
    async def bad_request(_, e: BadRequest):
        return error_response(e.status, e.message, "invalid_request_error", e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_, e: RequestValidationError):  # FastAPI answers 422; OpenAI and vLLM say 400
        return await bad_request(_, _invalid(e.errors()))

    @app.exception_handler(PayloadTooLarge)
    async def too_large(_, e: PayloadTooLarge):  # the rest of the body goes unread: close
        return error_response(413, str(e), "invalid_request_error", code="request_too_large", close=True)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(EngineUnavailable)
    async def unavailable(_, e: EngineUnavailable):  # shutting down: send the client elsewhere
        return error_response(503, f"the engine is unavailable: {e}", "server_error", code=e.code,
                              close=isinstance(e, ShuttingDownError))

    @app.exception_handler(RequestFailedError)
    async def request_failed(_, e: RequestFailedError):
        return error_response(500, str(e), "server_error", code="request_failed")


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
