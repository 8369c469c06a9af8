"""``POST /v1/{domain}/predict`` dispatched without the framework's per-request machinery.

Why: profiled under ``wrk`` (one-text requests, concurrency 32, int8 champion, 2 cores), the event
loop's thread was the bottleneck and ~60% of its time went to FastAPI's request handling around the
endpoint (routing, dependency solving, body parsing into a model field, exception middlewares,
response rendering), against ~13% in the endpoint itself; the model's thread was mostly idle.

This ASGI layer sits inside the key check, the body-size limit and the metrics middleware (so those
still apply, unchanged), and in front of FastAPI: it reads the body, parses it with ``json.loads`` and
validates it with the very request model FastAPI uses (same limits, same messages), then awaits the
app's own predict handler. FastAPI still declares the route, so OpenAPI documents it and metrics name it
by its template; the declared route calls the same handler, so the two cannot answer differently.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pydantic_core
from fastapi import HTTPException, status
from pydantic import BaseModel, ValidationError

#: The handler every predict request ends in: (domain, validated body, the ASGI receive) -> JSON payload.
PredictHandler = Callable[[str, Any, Callable[[], Awaitable[dict]]], Awaitable[dict]]
#: Turns validation errors (FastAPI's shape: ``loc`` starts with "body") into a 422 payload.
ErrorPayload = Callable[[list[dict]], dict]
#: Raises the HTTPException (a 503) of a domain that could not take even one more text now, before the body is
#: parsed: under overload most requests are refused, and refusing them must cost as little as possible.
EarlyRefusal = Callable[[str], None]

_PREDICT_PATH = re.compile(r"/v1/([^/]+)/predict")
_JSON = b"application/json"


def _json_content_type(headers: list[tuple[bytes, bytes]]) -> bool:
    """As FastAPI decides whether a body is JSON: no Content-Type, ``application/json`` or ``+json``."""
    for name, value in headers:
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == _JSON or (media.startswith(b"application/") and media.endswith(b"+json"))
    return True


def _body_errors(body: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[Any, list[dict]]:
    """The decoded JSON body, or the errors FastAPI would report for it (UnicodeDecodeError for bytes that are
    not UTF-8 text)."""
    if not body or not _json_content_type(headers):  # FastAPI then sees no body at all
        return None, [{"type": "missing", "loc": ["body"], "msg": "Field required"}]
    try:
        return json.loads(body), []
    except json.JSONDecodeError as exc:
        return None, [{"type": "json_invalid", "loc": ["body", exc.pos], "msg": "JSON decode error"}]


class PredictFastPath:
    """ASGI middleware: answers ``POST /v1/{domain}/predict`` itself, passes everything else on."""

    def __init__(
        self,
        app: Any,
        *,
        request_model: type[BaseModel],
        handler: PredictHandler,
        error_payload: ErrorPayload,
        route: Any,
        early_refusal: EarlyRefusal | None = None,
    ) -> None:
        self.app = app
        self.request_model = request_model
        self.handler = handler
        self.error_payload = error_payload
        self.route = route  # FastAPI's declared route: metrics read its template from the scope
        self.early_refusal = early_refusal

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or not (match := _PREDICT_PATH.fullmatch(scope["path"]))
        ):
            await self.app(scope, receive, send)
            return
        domain = match.group(1)
        scope["route"], scope["path_params"] = self.route, {"domain": domain}
        code, payload, headers = await self._answer(scope, receive, domain)
        content = pydantic_core.to_json(payload)
        await send(
            {
                "type": "http.response.start",
                "status": code,
                "headers": [
                    (b"content-type", _JSON),
                    (b"content-length", str(len(content)).encode()),
                    *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": content})

    async def _answer(self, scope: dict, receive: Any, domain: str) -> tuple[int, Any, dict[str, str]]:
        chunks = []
        more = True
        while more:  # the body-size limit outside this layer stops an oversized body as it streams
            message = await receive()
            if message["type"] == "http.disconnect":
                return 499, {"detail": "client disconnected"}, {}  # nginx's "client closed request": nobody reads it
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        if self.early_refusal is not None:
            try:
                self.early_refusal(domain)
            except HTTPException as exc:
                return exc.status_code, {"detail": exc.detail}, dict(exc.headers or {})
        try:
            decoded, errors = _body_errors(b"".join(chunks), scope.get("headers", []))
        except UnicodeDecodeError:  # not text at all: a 400, as FastAPI answers it
            return status.HTTP_400_BAD_REQUEST, {"detail": "There was an error parsing the body"}, {}
        if not errors:
            try:
                body = self.request_model.model_validate(decoded)
            except ValidationError as exc:
                errors = [
                    {"type": e["type"], "loc": ["body", *e["loc"]], "msg": e["msg"]}
                    for e in exc.errors(include_url=False, include_context=False, include_input=False)
                ]
        if errors:
            return status.HTTP_422_UNPROCESSABLE_CONTENT, self.error_payload(errors), {}
        try:
            return 200, await self.handler(domain, body, receive), {}
        except HTTPException as exc:
            return exc.status_code, {"detail": exc.detail}, dict(exc.headers or {})
