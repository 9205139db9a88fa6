"""Helpers to make accounts in tests (the users come from tests.support.factories)."""

from __future__ import annotations

from marketplace.models import Role, User
from marketplace.services.accounts import create_api_key
from tests.support.factories import TEST_PASSWORD, UserFactory

__all__ = ["TEST_PASSWORD", "make_api_key", "make_user"]


def make_user(role: Role = Role.AGENT, **fields) -> User:
    """A user of the role (password TEST_PASSWORD unless given); staff get is_staff."""
    return UserFactory(role=role, **fields)


def make_api_key(user: User, name: str = "test key") -> str:
    """Create an API key for an agent; returns the raw key."""
    return create_api_key(user=user, name=name).raw_key
