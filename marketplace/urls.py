"""Browser pages. Add your routes as new lines in the list (one group per area)."""

from django.urls import path

from marketplace.views import accounts as account_views

urlpatterns = [
    path("", account_views.home, name="home"),
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
]
