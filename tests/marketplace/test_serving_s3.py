"""Two GPU workers that share no disk serve each other's documents through a real S3 server.

moto runs in server mode (a real HTTP S3 endpoint, started here); each worker process has its
own KV directory and the same bucket. Worker A precomputes the document (its disk, its memory,
and the bucket); a load is routed to A, which holds it in memory; when A is killed, the next
load fails over to B, which reads the artifact from S3.
"""

from __future__ import annotations

import os
import signal
import socket

import pytest

from marketplace import registry
from marketplace.models import Document, GpuWorker, Load
from tests.marketplace.conftest import NANO, fund
from tests.marketplace.integration import (
    DOCUMENT_TEXT,
    GPU_QUEUES,
    skip_module_unless_worker_can_run,
    wait_for,
    wait_for_live_worker,
    wait_until_ready,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

skip_module_unless_worker_can_run()
moto_server = pytest.importorskip("moto.server")

BUCKET = "kvmarket-test"


@pytest.fixture
def s3_endpoint():
    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket=BUCKET)
    yield url
    server.stop()


def _env(kv_dir, endpoint: str) -> dict[str, str]:
    return {"KV_STORE_DIR": str(kv_dir), "KV_S3_BUCKET": BUCKET, "KV_S3_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1", "GPU_WORKER_HEARTBEAT_SECONDS": "0.5"}


def test_two_workers_without_a_shared_disk_serve_a_document_through_s3(
    celery_worker_factory, s3_endpoint, tmp_path, publisher_user, api_client, agent_user
):
    import boto3

    from marketplace.services.documents import create_document

    a = celery_worker_factory(GPU_QUEUES, extra_env=_env(tmp_path / "a", s3_endpoint),
                              ready_timeout=180)
    doc = create_document(publisher=publisher_user, title="Skerry Point", text=DOCUMENT_TEXT,
                          model_slug="tiny-qwen3")
    doc, _ = wait_until_ready(doc.pk)  # only A runs: A precomputed it
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    stored = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert any(doc.artifact_key in key for key in stored), stored
    b = celery_worker_factory(GPU_QUEUES, extra_env=_env(tmp_path / "b", s3_endpoint),
                              ready_timeout=180)
    assert not list((tmp_path / "b").rglob("*.safetensors"))  # B has nothing on its disk

    wait_for_live_worker(a.hostname)
    wait_for_live_worker(b.hostname)
    wait_for(lambda: doc.artifact_key in GpuWorker.objects.get(name=a.hostname).hot_keys,
             timeout=30, what="A to announce the document as hot")
    fund(agent_user, amount_nano=NANO)
    lic = api_client.post("/api/v1/licenses", {"document": doc.pk, "loads": 3},
                          format="json").json()
    body = {"model": "tiny-qwen3", "document": doc.pk, "license": lic["id"], "max_tokens": 8,
            "messages": [{"role": "user", "content": "What did the keeper write?"}]}

    registry.forget()
    r = api_client.post("/api/v1/chat/completions", body, format="json")
    assert r.status_code == 200, r.content
    assert Load.objects.get(pk=r.json()["kvmarket"]["load"]).worker == a.hostname  # hot there

    os.killpg(a.process.pid, signal.SIGKILL)  # A is gone (its row still looks live a moment)
    registry.forget()
    r = api_client.post("/api/v1/chat/completions", body, format="json")
    assert r.status_code == 200, r.content
    load = Load.objects.get(pk=r.json()["kvmarket"]["load"])
    assert load.worker == b.hostname and load.status == "succeeded"
    assert list((tmp_path / "b").rglob(f"{doc.artifact_key}.safetensors"))  # fetched from S3
    assert Document.objects.get(pk=doc.pk).status == "ready"
