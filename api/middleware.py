"""ASGI middleware: the request body size limit (413), enforced before any route reads the body."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from service.errors import PayloadTooLarge


class BodySizeLimit:
    """Answers 413 to a body over ``max_bytes``: at once from ``Content-Length``, or while buffering a
    chunked body (which is then replayed to the app, so it never sees a partial body)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        # With Transfer-Encoding the body's length is not Content-Length's (h11 reads it chunked and
        # keeps a Content-Length sent beside it): count what arrives instead.
        if length is not None and b"transfer-encoding" not in headers:
            if length.isdigit() and int(length) > self.max_bytes:
                await error_response(PayloadTooLarge(self.max_bytes))(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await error_response(PayloadTooLarge(self.max_bytes))(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)
