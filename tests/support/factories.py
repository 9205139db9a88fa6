"""factory-boy factories for the rows tests build directly: users of each role and documents
whose KV cache is ready. Money never comes from a factory: wallets, licenses and loads go
through the real services (tests.support.money.fund, purchase_license, reserve_load...)."""

from __future__ import annotations

import hashlib

import factory
from factory.django import DjangoModelFactory

from marketplace.models import Document, DocumentStatus, Role, User

TEST_PASSWORD = "kvm-test-Passw0rd!"


class UserFactory(DjangoModelFactory):
    """An agent by default: UserFactory(role=Role.PUBLISHER), UserFactory(role=Role.STAFF)."""

    class Meta:
        model = User

    email = factory.Sequence(lambda n: f"user{n}@example.test")
    role = Role.AGENT
    is_staff = factory.LazyAttribute(lambda user: user.role == Role.STAFF)

    @classmethod
    def _create(cls, model_class: type[User], *args, **kwargs) -> User:
        # Through the manager, so the password is hashed as a real sign-up's is.
        password = kwargs.pop("password", TEST_PASSWORD)
        return model_class.objects.create_user(*args, password=password, **kwargs)


class ReadyDocumentFactory(DjangoModelFactory):
    """A document whose KV cache is (said to be) precomputed and verified: no worker needed."""

    class Meta:
        model = Document

    publisher = factory.SubFactory(UserFactory, role=Role.PUBLISHER)
    title = factory.Sequence(lambda n: f"Doc {n}")
    text = factory.Sequence(lambda n: f"Document text {n}.")
    model_slug = "tiny-qwen3"
    price_per_load_nano = None
    status = DocumentStatus.READY
    n_tokens = 1000
    tokens_done = factory.SelfAttribute("n_tokens")
    tokens_total = factory.SelfAttribute("n_tokens")
    artifact_key = factory.LazyAttribute(lambda doc: hashlib.sha256(doc.text.encode()).hexdigest())
    artifact_bytes = 1234
    listed = True
    verification = factory.LazyFunction(
        lambda: {
            "passed": True, "bitwise_equal": True, "greedy_matched": 24, "greedy_total": 24,
            "match_rate": 1.0, "max_logit_diff": 0.0, "dtype": "float32",
        }
    )  # fmt: skip
