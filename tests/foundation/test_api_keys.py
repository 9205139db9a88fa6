"""API keys: shown once, stored as a hash; Bearer auth; revocation; per-key throttling."""

import hashlib
import re
import time

import pytest
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from marketplace.models import ApiKey
from marketplace.services.accounts import create_api_key

pytestmark = pytest.mark.django_db

KEY_RE = re.compile(r"kvm_[A-Za-z0-9_\-]{40,}")


def _create_key_in_browser(client, name: str = "my agent") -> str:
    response = client.post(reverse("api-key-create"), {"name": name})
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    keys = set(KEY_RE.findall(response.content.decode()))
    assert len(keys) == 1, keys
    return keys.pop()


def test_key_is_shown_once_and_only_its_hash_is_stored(client, agent_user) -> None:
    client.force_login(agent_user)
    assert client.get(reverse("api-key-create")).status_code == 200
    raw_key = _create_key_in_browser(client)
    stored = ApiKey.objects.get(user=agent_user)
    assert stored.name == "my agent"
    assert stored.key_hash == hashlib.sha256(raw_key.encode()).hexdigest()
    assert raw_key.startswith(stored.prefix) and len(stored.prefix) < len(raw_key) // 3
    for field in ApiKey._meta.get_fields():
        if hasattr(field, "attname"):
            assert raw_key not in str(getattr(stored, field.attname))
    # The list shows the prefix and status, never the key again.
    listing = client.get(reverse("api-keys")).content.decode()
    assert stored.prefix in listing and "my agent" in listing and "never" in listing
    assert raw_key not in listing
    assert not KEY_RE.search(listing)
    # And the key works.
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    me = api.get("/api/v1/me")
    assert me.status_code == 200 and me.json() == {"email": agent_user.email, "role": "agent"}
    stored.refresh_from_db()
    assert stored.last_used_at is not None
    assert "never" not in client.get(reverse("api-keys")).content.decode()


def test_key_form_errors_are_shown(client, agent_user) -> None:
    client.force_login(agent_user)
    response = client.post(reverse("api-key-create"), {"name": ""})
    assert response.status_code == 200
    assert "This field is required" in response.content.decode()
    assert not ApiKey.objects.exists()


def test_key_pages_are_for_agents(client, publisher_user) -> None:
    assert client.get(reverse("api-keys"))["Location"].startswith(reverse("login"))
    client.force_login(publisher_user)
    assert client.get(reverse("api-keys")).status_code == 403
    assert client.post(reverse("api-key-create"), {"name": "x"}).status_code == 403
    assert not ApiKey.objects.exists()


def test_revoke_in_browser_then_the_key_gets_401_json(client, agent_user) -> None:
    client.force_login(agent_user)
    raw_key = _create_key_in_browser(client)
    key = ApiKey.objects.get(user=agent_user)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    assert api.get("/api/v1/me").status_code == 200
    assert client.get(reverse("api-key-revoke", args=[key.pk])).status_code == 405  # POST only
    response = client.post(reverse("api-key-revoke", args=[key.pk]), follow=True)
    assert response.status_code == 200 and "revoked" in response.content.decode()
    key.refresh_from_db()
    assert key.revoked_at is not None
    denied = api.get("/api/v1/me")
    assert denied.status_code == 401
    assert denied["Content-Type"] == "application/json"
    assert denied.json()["error"]["code"] == "authentication_failed"


def test_an_agent_cannot_revoke_someone_elses_key(client, agent_user, django_user_model) -> None:
    other = django_user_model.objects.create_user(email="other@example.test", role="agent")
    key = create_api_key(user=other, name="theirs").api_key
    client.force_login(agent_user)
    assert client.post(reverse("api-key-revoke", args=[key.pk])).status_code == 404
    key.refresh_from_db()
    assert key.revoked_at is None


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "not_authenticated"),
        ("Bearer kvm_not-a-real-key-0000000000000000000000000", "authentication_failed"),
        ("Token something", "authentication_failed"),
        ("Bearer", "authentication_failed"),
    ],
)
def test_missing_or_unknown_key_gets_401_json(header, code, agent_key) -> None:
    client = APIClient()
    if header:
        client.credentials(HTTP_AUTHORIZATION=header)
    response = client.get("/api/v1/me")
    assert response.status_code == 401
    assert response["Content-Type"] == "application/json"
    assert response["WWW-Authenticate"].startswith("Bearer")
    body = response.json()
    assert body["error"]["code"] == code and body["error"]["message"]


def test_a_key_revoked_by_another_process_is_refused_within_the_cache_time(
    api_client, agent_user, settings
) -> None:
    settings.API_KEY_CACHE_SECONDS = 0.5
    assert api_client.get("/api/v1/me").status_code == 200  # the key is cached now
    revoked = timezone.now()
    ApiKey.objects.filter(user=agent_user).update(revoked_at=revoked)  # not through this process
    deadline = time.monotonic() + 5
    while api_client.get("/api/v1/me").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api_client.get("/api/v1/me").status_code == 401
    assert (timezone.now() - revoked).total_seconds() < 0.5 + 1.0


def test_a_cached_key_reads_no_key_row(api_client, agent_user, settings,
                                        django_assert_num_queries) -> None:
    settings.API_KEY_CACHE_SECONDS = 60
    assert api_client.get("/api/v1/me").status_code == 200
    ApiKey.objects.filter(user=agent_user).update(name="renamed")
    with django_assert_num_queries(0):
        api_client.get("/api/v1/me")


def test_an_inactive_users_key_gets_401(api_client, agent_user) -> None:
    agent_user.is_active = False
    agent_user.save()
    assert api_client.get("/api/v1/me").status_code == 401


def test_throttling_is_per_key_and_answers_429_json(api_client, agent_user, settings) -> None:
    settings.API_KEY_THROTTLE_RATE = "3/min"
    for _ in range(3):
        assert api_client.get("/api/v1/me").status_code == 200
    limited = api_client.get("/api/v1/me")
    assert limited.status_code == 429
    assert limited["Content-Type"] == "application/json"
    error = limited.json()["error"]
    assert error["code"] == "rate_limited"
    assert 0 < error["retry_after_seconds"] <= 60
    assert int(limited["Retry-After"]) > 0
    # Another key of the same agent has its own budget.
    other = APIClient()
    second_key = create_api_key(user=agent_user, name="second").raw_key
    other.credentials(HTTP_AUTHORIZATION=f"Bearer {second_key}")
    assert other.get("/api/v1/me").status_code == 200


def test_api_fixture_client_is_authenticated(api_client, agent_user) -> None:
    assert api_client.get("/api/v1/me").json()["email"] == agent_user.email
