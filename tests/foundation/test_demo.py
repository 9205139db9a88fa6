"""The one-command demo, end to end: `python -m kvmarket.devserver` on the embedded defaults
(SQLite, an embedded Redis broker, a real worker process, gunicorn) serves a paid completion, on
the default model (SmolLM2-135M-Instruct), answering the README's question from the document,
then 32 concurrent agents without an error.

The converted model is taken from the shared model cache ($KVMARKET_MODEL_CACHE or
~/.cache/kvmarket/models), as the real-model tests leave it, so only a first run converts."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from inference.models import default_model_cache_dir
from tests.support.subprocess_settings import REPO_ROOT, clean_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _call(url: str, key: str, body: dict | None = None, **headers: str) -> tuple[int, dict]:
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, {"raw": error.read()[:300].decode(errors="replace")}


def _32_agents_at_once(base: str, key: str, document: dict) -> None:
    """32 concurrent completions (half streamed) on the embedded default: no 5xx, no crash,
    each served one charged; 429s (the per-agent in-flight cap) are retried as told."""
    from concurrent.futures import ThreadPoolExecutor

    status, license_ = _call(f"{base}/licenses", key, {"document": document["id"], "loads": 40})
    assert status == 201, license_
    seen: list[int] = []

    def one(i: int) -> tuple[int, str]:
        body = {"model": document["model"], "document": document["id"],
                "license": license_["id"], "max_tokens": 2, "stream": i % 2 == 1,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "Who is the narrator?"}]}
        request = urllib.request.Request(
            f"{base}/chat/completions", data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                     "Idempotency-Key": f"demo-32-{i}"})
        for _ in range(200):
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    seen.append(response.status)
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as error:
                seen.append(error.code)
                if error.code != 429:
                    return error.code, error.read()[:300].decode(errors="replace")
                time.sleep(float(error.headers.get("Retry-After", "1")))
        return 429, "still throttled"

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert all(code < 500 for code in seen), seen
    assert [code for code, _ in results] == [200] * 32, results
    for i, (_, text) in enumerate(results):
        if i % 2:  # streamed: complete, and its usage chunk says it was charged
            assert text.rstrip().endswith("data: [DONE]"), text
            usage = [json.loads(b[6:]) for b in text.split("\n\n") if '"kvmarket"' in b][-1]
            assert usage["kvmarket"]["charge_pending"] is False
        else:
            assert json.loads(text)["kvmarket"]["charge_pending"] is False


@pytest.mark.timeout(1200)  # the model's first load, a precompute, then 32 loads on 2 CPUs
def test_demo_serves_a_paid_completion_from_the_hosted_kv(tmp_path):
    port = _free_port()
    log = (tmp_path / "demo.log").open("w+")
    env = clean_env(tmp_path / "var", KVMARKET_MODEL_CACHE=str(default_model_cache_dir()))
    demo = subprocess.Popen(
        [sys.executable, "-m", "kvmarket.devserver", "--port", str(port)],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}/api/v1"
    try:
        key, document, deadline = None, None, time.monotonic() + 480
        while time.monotonic() < deadline and document is None:
            time.sleep(1)
            assert demo.poll() is None, (tmp_path / "demo.log").read_text()[-3000:]
            found = re.search(r"kvm_[A-Za-z0-9_-]+", (tmp_path / "demo.log").read_text())
            if key is None and found:
                key = found.group(0)
            if key:
                try:
                    status, listing = _call(f"{base}/documents", key)
                except OSError:  # the web server is not up yet
                    continue
                ready = [d for d in listing.get("results", [])
                         if d["status"] == "ready" and d["title"].startswith("Moby-Dick")]
                document = ready[0] if ready else None
        assert document, (tmp_path / "demo.log").read_text()[-3000:]

        status, license_ = _call(f"{base}/licenses", key, {"document": document["id"], "loads": 2})
        assert status == 201, license_
        body = {
            "model": document["model"], "document": document["id"], "license": license_["id"],
            "max_tokens": 16, "messages": [{"role": "user", "content": "Who is the narrator?"}],
        }  # fmt: skip
        headers = {"Idempotency-Key": "demo-test"}
        status, completion = _call(f"{base}/chat/completions", key, body, **headers)
        assert status == 200, completion
        cached = completion["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == document["n_tokens"] > 0
        assert document["model"] == "smollm2-135m"
        assert document["example_questions"] == ["Who is the narrator?"]
        assert "Ishmael" in completion["choices"][0]["message"]["content"], completion
        _32_agents_at_once(base, key, document)
    finally:
        demo.send_signal(signal.SIGINT)  # Ctrl-C: the demo stops its worker, web and Redis
        try:
            demo.wait(timeout=60)
        except subprocess.TimeoutExpired:
            demo.kill()
        log.close()
    assert "== stopping the web server and the worker" in (tmp_path / "demo.log").read_text()
