"""Browser pages. Add your routes as new lines in the list (one group per area)."""

from django.urls import path

from marketplace.views import accounts as account_views
from marketplace.views import agent as agent_views
from marketplace.views import ops as ops_views
from marketplace.views import publisher as publisher_views
from marketplace.views import store as store_views
from marketplace.views import stripe_webhook as stripe_webhook_views

urlpatterns = [
    path("", account_views.home, name="home"),
    path("stripe/webhook", stripe_webhook_views.stripe_webhook, name="stripe-webhook"),
    path("favicon.ico", account_views.favicon, name="favicon"),
    # --- storefront (public) ------------------------------------------------------------------
    path("documents/", store_views.catalogue, name="catalogue"),
    path("documents/<int:document_id>/", store_views.document_page, name="document-page"),
    path("documents/<int:document_id>/buy/", store_views.document_buy, name="document-buy"),
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
    path(
        "publisher/documents/<int:document_id>/edit/",
        publisher_views.document_edit,
        name="document-edit",
    ),
    path("publisher/payouts/connect/", publisher_views.stripe_connect, name="publisher-connect"),
    # --- agent console ------------------------------------------------------------------------
    path("console/", agent_views.console, name="agent-console"),
    path("console/topup/", agent_views.topup, name="agent-topup"),
    path("console/credits/", agent_views.sandbox_credit, name="agent-sandbox-credit"),
    path("console/licenses/", agent_views.licenses, name="agent-licenses"),
    # --- operations console (staff) -----------------------------------------------------------
    path("ops/", ops_views.console, name="ops-console"),
    path("ops/settle/", ops_views.settle_now, name="ops-settle"),
    path("ops/payouts/<int:payout_id>/approve/", ops_views.approve, name="ops-payout-approve"),
    path("ops/payouts/<int:payout_id>/reject/", ops_views.reject, name="ops-payout-reject"),
    path("ops/payouts/<int:payout_id>/retry/", ops_views.retry, name="ops-payout-retry"),
    path("ops/payouts/<int:payout_id>/repay/", ops_views.repay, name="ops-payout-repay"),
]
