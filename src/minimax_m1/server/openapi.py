"""The OpenAPI schema's request bodies and error responses. The POST routes read their bodies themselves
(size limit, safe JSON, strict validation off the event loop), so FastAPI cannot see the request models:
they are declared here, with every status a route may answer and the OpenAI error object, so schema
fuzzers and client generators know the API."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .protocol import ErrorResponse

_REF = "#/components/schemas/{model}"


def _error(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


GET_RESPONSES = {
    401: _error("Missing or incorrect API key (with --api-key)"),
    404: _error("No such model"),
    503: {"description": "The engine failed, or the server is shutting down"},
}


def post_responses(response_model: type[BaseModel]) -> dict:
    return {
        200: {"model": response_model, "description": "The completion; server-sent events with stream: true",
              "content": {"text/event-stream": {"schema": {"type": "string"}}}},
        400: _error("Invalid request (the error names the field), or a Host header not allowed"),
        401: GET_RESPONSES[401],
        404: _error("No such model (the request's `model`)"),
        413: _error("The body is over --max-request-bytes"),
        415: _error("The body is not sent as application/json"),
        500: _error("The request failed inside the engine"),
        503: _error("The engine failed, or the server is shutting down"),
    }


def request_body(model: type[BaseModel]) -> dict:
    """openapi_extra for a route whose JSON body is `model`."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}}}


_META = ("title", "default", "description")


def _optional_fields_take_null(defs: dict) -> None:
    """Every optional field of a request model reads an explicit null as its default (protocol.OpenAIModel):
    say so in the schema, so that a schema fuzzer or a generated client does not take it for an error."""
    for schema in defs.values():
        required = set(schema.get("required", ()))
        for name, prop in schema.get("properties", {}).items():
            if name in required or prop.get("type") == "null" or {"type": "null"} in prop.get("anyOf", ()):
                continue
            meta = {k: prop.pop(k) for k in _META if k in prop}
            schema["properties"][name] = {"anyOf": [prop, {"type": "null"}], **meta}


def with_request_schemas(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Add the request models (and the models they use) to the app's schema components."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _, defs = models_json_schema([(m, "validation") for m in models], ref_template=_REF)
            _optional_fields_take_null(defs.get("$defs", {}))
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
