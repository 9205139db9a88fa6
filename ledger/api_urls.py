"""Wallet and earnings API (mounted at /api/v1/ beside the marketplace API)."""

urlpatterns: list = []
