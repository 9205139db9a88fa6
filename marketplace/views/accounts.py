"""Account pages: home, sign-up, login/logout, password change, and agents' API keys."""

from __future__ import annotations

from functools import wraps

from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponsePermanentRedirect,
    HttpResponseRedirect,
)
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import NoReverseMatch, reverse, reverse_lazy
from django.views.decorators.http import require_http_methods, require_POST

from marketplace.forms.accounts import ApiKeyCreateForm, EmailAuthenticationForm, SignUpForm
from marketplace.models import ApiKey, Role, User
from marketplace.selectors.accounts import api_keys_of
from marketplace.services.accounts import create_api_key, register_user, revoke_api_key


def role_home_url(user: User) -> str:
    """Where a user lands after sign-up or login: their role's main page when it exists."""
    name = {Role.PUBLISHER: "publisher-dashboard", Role.AGENT: "agent-console"}.get(user.role)
    if name:
        try:
            return reverse(name)
        except NoReverseMatch:
            pass
    if user.role == Role.AGENT:
        return reverse("api-keys")
    return reverse("home")


def agent_required(view):
    """Logged-in agents only; others get a 403 page that says why."""

    @wraps(view)
    @login_required
    def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if request.user.role != Role.AGENT:
            return render(
                request,
                "accounts/forbidden.html",
                {"reason": "API keys belong to agent accounts. Sign up as an agent to get one."},
                status=403,
            )
        return view(request, *args, **kwargs)

    return wrapper


def home(request: HttpRequest) -> HttpResponse:
    from marketplace.selectors.economics import headline

    return render(request, "home.html", {"headline": headline()})


def favicon(request: HttpRequest) -> HttpResponse:
    from django.templatetags.static import static

    return HttpResponsePermanentRedirect(static("kvmarket/favicon.svg"))


@require_http_methods(["GET", "POST"])
def signup(request: HttpRequest) -> HttpResponse:
    if request.user.is_authenticated:
        return redirect(role_home_url(request.user))
    initial_role = request.GET.get("role")
    form = SignUpForm(
        request.POST or None,
        initial={"role": initial_role} if initial_role in (Role.PUBLISHER, Role.AGENT) else None,
    )
    if request.method == "POST" and form.is_valid():
        user = register_user(
            email=form.cleaned_data["email"],
            password=form.cleaned_data["password1"],
            role=form.role_value,
            display_name=form.cleaned_data["display_name"],
        )
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        messages.success(request, f"Welcome to kvmarket, {user.display_name or user.email}.")
        return redirect(role_home_url(user))
    return render(request, "registration/signup.html", {"form": form})


class LoginView(auth_views.LoginView):
    form_class = EmailAuthenticationForm
    redirect_authenticated_user = True

    def get_default_redirect_url(self) -> str:
        return role_home_url(self.request.user)


class LogoutView(auth_views.LogoutView):
    """POST only (Django's LogoutView refuses GET)."""


class PasswordChangeView(auth_views.PasswordChangeView):
    success_url = reverse_lazy("password_change_done")


class PasswordChangeDoneView(auth_views.PasswordChangeDoneView):
    pass


@agent_required
def api_keys(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "accounts/api_keys.html",
        {"api_keys": api_keys_of(request.user), "form": ApiKeyCreateForm()},
    )


@agent_required
@require_http_methods(["GET", "POST"])
def api_key_create(request: HttpRequest) -> HttpResponse:
    form = ApiKeyCreateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        issued = create_api_key(user=request.user, name=form.cleaned_data["name"])
        # Rendered, not redirected: the raw key exists only in this response.
        response = render(
            request,
            "accounts/api_key_created.html",
            {"api_key": issued.api_key, "raw_key": issued.raw_key},
        )
        response["Cache-Control"] = "no-store"
        return response
    return render(request, "accounts/api_key_create.html", {"form": form})


@agent_required
@require_POST
def api_key_revoke(request: HttpRequest, key_id: int) -> HttpResponseRedirect:
    api_key = get_object_or_404(ApiKey, pk=key_id, user=request.user)
    revoke_api_key(user=request.user, key_id=api_key.pk)
    messages.success(request, f"Key {api_key.prefix}… ({api_key.name}) is revoked.")
    return redirect("api-keys")
