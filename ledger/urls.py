"""Stripe webhook and other non-API ledger endpoints (mounted at /stripe/)."""

urlpatterns: list = []
