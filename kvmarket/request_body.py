"""Every request's body is read to its end before its response goes out.

An answer made without reading the body (a 401, a throttled 429, a 413) leaves the body to
gunicorn, whose gthread worker reads it after the response is written. By then a client on a
kept-alive connection may have sent its next request: its bytes are read into gunicorn's
buffer with the rest of the body, the socket does not become readable again, and that request
waits unanswered until the keep-alive timeout closes the connection (the client sees "Server
disconnected without sending a response").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from django.http import HttpRequest, HttpResponseBase, UnreadablePostError

# A larger unread body is left to the server (it would be read whole, for nothing).
MAX_DRAIN_BYTES = 1024 * 1024
CHUNK_BYTES = 64 * 1024


class DrainRequestBodyMiddleware:
    """First in MIDDLEWARE: it sees the final response, whatever produced it."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        response = self.get_response(request)
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if 0 < length <= MAX_DRAIN_BYTES:
            # Read once already (request.body, DRF's parsers): this returns at once.
            with contextlib.suppress(UnreadablePostError):
                while request.read(CHUNK_BYTES):
                    pass
        return response
