"""Ledger tests run on PostgreSQL only: the money rules are enforced by PostgreSQL triggers,
row locks and constraints, which SQLite does not have. CI always runs them on PostgreSQL."""

import itertools

import pytest
from django.db import connection

from marketplace.models import Role, User

_seq = itertools.count(1)


@pytest.fixture(autouse=True)
def _require_postgresql():
    if connection.vendor != "postgresql":
        pytest.fail(
            "tests/ledger must run on PostgreSQL (money rules live in the database): set "
            "DATABASE_URL=postgres://postgres@127.0.0.1:5432/kvm_ledger",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def _stripe_settings(settings):
    settings.STRIPE_SECRET_KEY = "sk_test_kvmarket"
    settings.STRIPE_WEBHOOK_SECRET = "whsec_test_kvmarket"
    settings.STRIPE_API_BASE = ""
    settings.STRIPE_MAX_NETWORK_RETRIES = 0
    settings.PAYOUT_THRESHOLD_NANO_USD = 10 * 10**9


def make_user(role: Role, **fields) -> User:
    # No password: hashing one costs ~0.3 s of CPU per user.
    return User.objects.create_user(
        email=f"{role.value}{next(_seq)}@example.test", password=None, role=role, **fields
    )


@pytest.fixture
def agent(db):
    return make_user(Role.AGENT)


@pytest.fixture
def publisher(db):
    return make_user(Role.PUBLISHER)


@pytest.fixture
def staff(db):
    return User.objects.create_superuser(email=f"staff{next(_seq)}@example.test", password=None)
