"""ASGI middlewares in front of the routes: the Host check (DNS rebinding), the API key, JSON-only POSTs,
and a last catch that turns an unexpected exception into an OpenAI 500 without closing the connection.
A refusal that leaves the request body unread says `Connection: close` and closes."""
from __future__ import annotations

import hmac
import logging

from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from .serving import error_body

logger = logging.getLogger(__name__)

CLOSE = {"Connection": "close"}


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                   close: bool = False) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=CLOSE if close else None)


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def host_name(host: str) -> str:
    """A Host header's name, lower case, without the port ("[::1]:8000" -> "::1")."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class HostCheck:
    """Refuse requests whose Host header is not one of `names` (any port): a web page that rebinds its own
    domain to 127.0.0.1 still sends its own domain as the Host, so it cannot reach a loopback server."""

    def __init__(self, app, names: set[str]):
        self.app, self.names = app, names

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = _header(scope, b"host")
            name = host_name(host.decode("latin-1")) if host is not None else None
            if name not in self.names:
                shown = "none" if host is None else repr(host.decode("latin-1"))
                await error_response(400, f"the Host header {shown} is not allowed: this server answers to "
                                          f"{', '.join(sorted(self.names))} (add names with --allowed-hosts)",
                                     "invalid_request_error", code="invalid_host", close=True)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ApiKey:
    """With an API key, every /v1 route needs `Authorization: Bearer <key>` (the scheme in any case);
    /health, /metrics and /version stay open."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            scheme, _, token = (_header(scope, b"authorization") or b"").strip().partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected)):
                await error_response(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                                     "authentication_error", code="invalid_api_key", close=True)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequireJson:
    """POST bodies must say `Content-Type: application/json`. A browser page can POST text/plain to any
    address without a CORS preflight; refusing every other type closes that door."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            given = (_header(scope, b"content-type") or b"").decode("latin-1")
            if given.split(";", 1)[0].strip().lower() != "application/json":
                await error_response(415, f"the request body must be JSON sent with 'Content-Type: application/json' "
                                          f"(got {given or 'no Content-Type'!r})", "invalid_request_error",
                                     code="unsupported_media_type", close=True)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class CatchAll:
    """The innermost middleware: an exception no handler took becomes an OpenAI 500 (logged once, with its
    traceback) and the connection stays usable; Starlette's own fallback would re-raise it, and uvicorn
    then closes the connection without saying so. A client that left mid-upload is not an error at all."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            logger.info("client disconnected during %s %s", scope["method"], scope["path"])
        except Exception as e:  # noqa: BLE001 - the last line of defence
            logger.exception("%s %s failed", scope["method"], scope["path"])
            if started:
                raise  # half a response is out: only closing the connection can end it
            await error_response(500, f"internal server error: {type(e).__name__}: {e}", "server_error")(
                scope, receive, send)
