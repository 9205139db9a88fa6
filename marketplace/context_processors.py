"""Template context for every page: whether this instance runs in sandbox mode."""

from django.conf import settings
from django.http import HttpRequest


def site(request: HttpRequest) -> dict:
    return {"sandbox_mode": settings.SANDBOX_MODE}
