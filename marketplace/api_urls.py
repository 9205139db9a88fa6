"""The public v1 API (mounted at /api/v1/)."""

from django.urls import path

from marketplace.api import accounts as accounts_api
from marketplace.api import completions as completions_api
from marketplace.api import documents as documents_api
from marketplace.api import economics as economics_api
from marketplace.api import licenses as licenses_api
from marketplace.api import wallet as wallet_api

urlpatterns = [
    path("me", accounts_api.MeView.as_view(), name="api-me"),
    path("documents", documents_api.DocumentListView.as_view(), name="api-documents"),
    path(
        "documents/<int:pk>", documents_api.DocumentDetailView.as_view(), name="api-document"
    ),
    path(
        "documents/<int:pk>/unlist",
        documents_api.DocumentUnlistView.as_view(),
        name="api-document-unlist",
    ),
    path(
        "documents/<int:pk>/relist",
        documents_api.DocumentRelistView.as_view(),
        name="api-document-relist",
    ),
    path(
        "documents/<int:pk>/retry",
        documents_api.DocumentRetryView.as_view(),
        name="api-document-retry",
    ),
    path(
        "documents/<int:pk>/economics",
        economics_api.DocumentEconomicsView.as_view(),
        name="api-document-economics",
    ),
    path("documents/<int:pk>/kv", documents_api.DocumentKVView.as_view(), name="api-document-kv"),
    path("licenses", licenses_api.LicenseListView.as_view(), name="api-licenses"),
    path("licenses/<int:pk>", licenses_api.LicenseDetailView.as_view(), name="api-license"),
    path("loads", licenses_api.LoadListView.as_view(), name="api-loads"),
    path(
        "chat/completions",
        completions_api.ChatCompletionsView.as_view(),
        name="api-chat-completions",
    ),
    path("completions", completions_api.CompletionsView.as_view(), name="api-completions"),
    path("wallet", wallet_api.WalletView.as_view(), name="api-wallet"),
    path("wallet/topups", wallet_api.TopUpView.as_view(), name="api-wallet-topups"),
    path("wallet/history", wallet_api.WalletHistoryView.as_view(), name="api-wallet-history"),
    path("earnings", wallet_api.EarningsView.as_view(), name="api-earnings"),
]
