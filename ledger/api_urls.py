"""Wallet and earnings API (mounted at /api/v1/ beside the marketplace API)."""

from django.urls import path

from ledger import api

urlpatterns = [
    path("wallet", api.WalletView.as_view(), name="api-wallet"),
    path("wallet/topups", api.TopUpView.as_view(), name="api-wallet-topups"),
    path("wallet/history", api.WalletHistoryView.as_view(), name="api-wallet-history"),
    path("earnings", api.EarningsView.as_view(), name="api-earnings"),
]
