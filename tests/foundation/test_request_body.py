"""A request's body is read before its response goes out, whatever answered it.

gunicorn's gthread worker reads an unread body after writing the response; a kept-alive
client's next request, sent by then, is read into gunicorn's buffer with it and waits
unanswered until the keep-alive timeout (kvmarket.request_body).
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.django_db

BODY = json.dumps({"document": 1, "license": 1, "messages": [{"role": "user", "content": "Hi"}]})


@pytest.mark.parametrize("headers", [
    {"HTTP_AUTHORIZATION": "Bearer not-a-key"},  # 401 before the view reads anything
    {},  # 401: no credentials
])
def test_an_answer_made_without_reading_the_body_still_reads_it_first(client, headers) -> None:
    response = client.post("/api/v1/chat/completions", data=BODY,
                           content_type="application/json", **headers)
    assert response.status_code == 401
    assert len(response.wsgi_request.environ["wsgi.input"]) == 0  # nothing left for gunicorn

