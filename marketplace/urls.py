"""Browser pages. Add your routes as new lines in the list (one group per area)."""

from django.urls import path

from marketplace.views import accounts as account_views
from marketplace.views import agent as agent_views
from marketplace.views import publisher as publisher_views
from marketplace.views import stripe_webhook as stripe_webhook_views

urlpatterns = [
    path("", account_views.home, name="home"),
    path("stripe/webhook", stripe_webhook_views.stripe_webhook, name="stripe-webhook"),
    # --- accounts -----------------------------------------------------------------------------
    path("account/signup/", account_views.signup, name="signup"),
    path("account/login/", account_views.LoginView.as_view(), name="login"),
    path("account/logout/", account_views.LogoutView.as_view(), name="logout"),
    path("account/password/", account_views.PasswordChangeView.as_view(), name="password_change"),
    path(
        "account/password/done/",
        account_views.PasswordChangeDoneView.as_view(),
        name="password_change_done",
    ),
    path("account/api-keys/", account_views.api_keys, name="api-keys"),
    path("account/api-keys/new/", account_views.api_key_create, name="api-key-create"),
    path(
        "account/api-keys/<int:key_id>/revoke/",
        account_views.api_key_revoke,
        name="api-key-revoke",
    ),
    # --- publisher pages ----------------------------------------------------------------------
    path("publisher/", publisher_views.dashboard, name="publisher-dashboard"),
    path(
        "publisher/documents/",
        publisher_views.dashboard_documents,
        name="publisher-documents-partial",
    ),
    path("publisher/documents/new/", publisher_views.document_create, name="document-create"),
    path(
        "publisher/documents/<int:document_id>/",
        publisher_views.document_detail,
        name="document-detail",
    ),
    path(
        "publisher/documents/<int:document_id>/status/",
        publisher_views.document_status,
        name="document-status",
    ),
    path(
        "publisher/documents/<int:document_id>/retry/",
        publisher_views.document_retry,
        name="document-retry",
    ),
    path(
        "publisher/documents/<int:document_id>/unlist/",
        publisher_views.document_unlist,
        name="document-unlist",
    ),
    path(
        "publisher/documents/<int:document_id>/relist/",
        publisher_views.document_relist,
        name="document-relist",
    ),
    path("publisher/payouts/connect/", publisher_views.stripe_connect, name="publisher-connect"),
    # --- agent console ------------------------------------------------------------------------
    path("console/", agent_views.console, name="agent-console"),
    path("console/topup/", agent_views.topup, name="agent-topup"),
]
