"""Sign-up, login, logout and password change through the Django test client."""

import pytest
from django.contrib.auth import SESSION_KEY
from django.urls import reverse

from marketplace.models import Role, User
from tests.support.accounts import TEST_PASSWORD

pytestmark = pytest.mark.django_db

NEW_PASSWORD = "another-Secret-42!"


def _signup(client, **overrides):
    data = {
        "role": "publisher",
        "email": "Pub.Lisher@Example.test",
        "display_name": "Pub",
        "password1": TEST_PASSWORD,
        "password2": TEST_PASSWORD,
        **overrides,
    }
    return client.post(reverse("signup"), data)


def test_home_page_explains_kvmarket(client) -> None:
    response = client.get("/")
    assert response.status_code == 200
    body = response.content.decode()
    assert "KV cache" in body
    assert reverse("signup") in body and reverse("login") in body
    assert "kvmarket/site.css" in body


@pytest.mark.parametrize("role", ["publisher", "agent"])
def test_signup_creates_a_user_of_the_chosen_role_and_logs_in(client, role) -> None:
    response = _signup(client, role=role, email=f"New.{role}@Example.test")
    assert response.status_code == 302
    user = User.objects.get(email=f"new.{role}@example.test")  # stored lower-case
    assert user.role == role
    assert not user.is_staff
    assert user.check_password(TEST_PASSWORD)
    assert client.session[SESSION_KEY] == str(user.pk)
    page = client.get(response["Location"], follow=True)
    assert page.status_code == 200
    assert user.email in page.content.decode()


def test_signup_form_errors_are_shown_on_the_form(client, publisher_user) -> None:
    response = _signup(client, email=publisher_user.email.upper(), password2="different-1!")
    assert response.status_code == 200
    body = response.content.decode()
    assert "already exists" in body
    assert "do not match" in body
    assert 'class="errorlist"' in body
    assert User.objects.count() == 1
    weak = _signup(client, email="weak@example.test", password1="123", password2="123")
    assert "too short" in weak.content.decode()
    assert not User.objects.filter(email="weak@example.test").exists()


def test_signup_cannot_choose_staff(client) -> None:
    response = _signup(client, role="staff", email="sneaky@example.test")
    assert response.status_code == 200
    assert "Select a valid choice" in response.content.decode()
    assert not User.objects.filter(email="sneaky@example.test").exists()


def test_login_with_email_then_logout_with_post(client, agent_user) -> None:
    page = client.get(reverse("login"))
    assert page.status_code == 200 and "Email address" in page.content.decode()
    bad = client.post(reverse("login"), {"username": agent_user.email, "password": "wrong"})
    assert bad.status_code == 200
    assert "correct" in bad.content.decode()  # "Please enter a correct email address and password"
    assert SESSION_KEY not in client.session
    ok = client.post(
        reverse("login"), {"username": agent_user.email.upper(), "password": TEST_PASSWORD}
    )
    assert ok.status_code == 302
    assert client.session[SESSION_KEY] == str(agent_user.pk)
    home = client.get("/").content.decode()
    assert reverse("api-keys") in home and reverse("logout") in home
    assert client.get(reverse("logout")).status_code == 405  # logging out takes a POST
    assert client.post(reverse("logout")).status_code == 302
    assert SESSION_KEY not in client.session


def test_login_honours_next(client, publisher_user) -> None:
    response = client.post(
        reverse("login") + "?next=/account/password/",
        {"username": publisher_user.email, "password": TEST_PASSWORD, "next": "/account/password/"},
    )
    assert response["Location"] == "/account/password/"


def test_password_change(client, publisher_user) -> None:
    assert client.get(reverse("password_change"))["Location"].startswith(reverse("login"))
    client.force_login(publisher_user)
    wrong = client.post(
        reverse("password_change"),
        {"old_password": "nope", "new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD},
    )
    assert wrong.status_code == 200 and 'class="errorlist"' in wrong.content.decode()
    response = client.post(
        reverse("password_change"),
        {"old_password": TEST_PASSWORD, "new_password1": NEW_PASSWORD,
         "new_password2": NEW_PASSWORD},
    )  # fmt: skip
    assert response.status_code == 302
    assert response["Location"] == reverse("password_change_done")
    publisher_user.refresh_from_db()
    assert publisher_user.check_password(NEW_PASSWORD)
    assert client.session[SESSION_KEY] == str(publisher_user.pk)  # still logged in
    client.post(reverse("logout"))
    assert client.login(email=publisher_user.email, password=NEW_PASSWORD)


def test_nav_shows_role_links(client, publisher_user, agent_user, staff_user) -> None:
    client.force_login(publisher_user)
    body = client.get("/").content.decode()
    assert reverse("api-keys") not in body
    assert "/admin/" not in body
    client.force_login(agent_user)
    assert reverse("api-keys") in client.get("/").content.decode()
    client.force_login(staff_user)
    assert "/admin/" in client.get("/").content.decode()


def test_admin_is_for_staff_only(client, publisher_user, agent_user, staff_user) -> None:
    assert client.get("/admin/").status_code == 302  # to the admin login
    for user in (publisher_user, agent_user):
        client.force_login(user)
        response = client.get("/admin/")
        assert response.status_code == 302 and "/admin/login/" in response["Location"]
        assert client.get("/admin/marketplace/user/").status_code == 302
    client.force_login(staff_user)
    assert client.get("/admin/").status_code == 200


def test_superuser_sees_accounts_in_admin(client) -> None:
    admin = User.objects.create_superuser(email="root@example.test", password=TEST_PASSWORD)
    assert admin.role == Role.STAFF
    client.force_login(admin)
    assert client.get("/admin/marketplace/user/").status_code == 200
    assert client.get("/admin/marketplace/apikey/").status_code == 200


def test_unknown_page_is_an_html_404_and_unknown_api_path_a_json_404(client, settings) -> None:
    settings.DEBUG = False
    page = client.get("/no-such-page/")
    assert page.status_code == 404 and page["Content-Type"].startswith("text/html")
    api = client.get("/api/v1/no-such-endpoint")
    assert api.status_code == 404
    assert api.json()["error"]["code"] == "not_found"


def test_healthz_answers_before_host_checks(client, settings) -> None:
    settings.ALLOWED_HOSTS = ["kvmarket.example.com"]
    response = client.get("/healthz", HTTP_HOST="127.0.0.1:8000")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert client.get("/", HTTP_HOST="evil.example").status_code == 400
