"""The server's first look at per-request settings: an ASGI middleware `coco-tools serve` adds
through vLLM's `--middleware` option, which reads a request's JSON body as the client sent it.

Why before vLLM: the OpenAI schema types `vllm_xargs` values as `str | int | float | list`, and
pydantic coerces while it validates, so `{"coco_alpha": true}` reaches serve/validator.py as the
number 1 (served as alpha 1), and `{"coco_alpha": {}}` is refused with a 12-line error. Here the
same strict schema (request_settings.Menu.parse) sees the raw values first: anything it refuses
gets vLLM's error body with one line, status 400; everything else passes on untouched.
"""

from __future__ import annotations

import json
import os

from vllm_coco.core.names import PER_REQUEST_ENV
from vllm_coco.serve import request_settings


def refusal(body: bytes) -> str | None:
    """Why the per-request settings in a raw request body are refused, or None (also for a body that
    is not JSON or has no vllm_xargs: vLLM's own checks answer those)."""
    try:
        xargs = json.loads(body).get("vllm_xargs")
    except (ValueError, AttributeError, RecursionError):
        return None
    ne_dir = os.environ.get(PER_REQUEST_ENV)
    if not isinstance(xargs, dict) or not ne_dir:
        return None

    try:
        request_settings.menu_of(ne_dir).parse(xargs)
    except ValueError as exc:
        return str(exc)
    return None


class StrictSettings:
    """ASGI middleware: POST bodies whose coco_* settings the strict schema refuses get a one-line
    400; every other request reaches the app with its body replayed unchanged."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        messages, body = [], b""
        while True:  # the whole body: vLLM reads it whole too
            message = await receive()
            messages.append(message)
            body += message.get("body", b"")
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        why = refusal(body) if b"coco" in body.lower() else None
        if why is not None:
            return await _bad_request(send, why)
        return await self.app(scope, _replay(messages, receive), send)


def _replay(messages: list, receive):
    async def replayed():
        return messages.pop(0) if messages else await receive()

    return replayed


async def _bad_request(send, message: str) -> None:
    """vLLM's error body (`{"error": {"message", "type", "param", "code"}}`), status 400."""
    payload = json.dumps({"error": {"message": message, "type": "BadRequestError", "param": None,
                                    "code": 400}}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
