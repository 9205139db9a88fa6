"""The public v1 API (mounted at /api/v1/)."""

from django.urls import path

from marketplace.api import accounts as accounts_api

urlpatterns = [
    path("me", accounts_api.MeView.as_view(), name="api-me"),
]
