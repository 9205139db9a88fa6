"""Helpers to make accounts in tests."""

from __future__ import annotations

import itertools

from marketplace.models import Role, User
from marketplace.services.accounts import create_api_key

TEST_PASSWORD = "kvm-test-Passw0rd!"
_seq = itertools.count(1)


def make_user(*, role: Role = Role.AGENT, email: str | None = None, **fields) -> User:
    email = email or f"{role.value}{next(_seq)}@example.test"
    if role == Role.STAFF:
        fields.setdefault("is_staff", True)
    return User.objects.create_user(email=email, password=TEST_PASSWORD, role=role, **fields)


def make_api_key(user: User, name: str = "test key") -> str:
    """Create an API key for an agent; returns the raw key."""
    return create_api_key(user=user, name=name).raw_key
