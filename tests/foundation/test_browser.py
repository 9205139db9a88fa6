"""A person in Debian's chromium signs up as an agent, creates an API key and logs out."""

import re

import pytest

from marketplace.models import ApiKey, User

pytestmark = pytest.mark.browser


def test_agent_signs_up_makes_a_key_logs_out(live_server, browser_page, artifacts_dir) -> None:
    page = browser_page
    page.goto(live_server.url + "/")
    assert "KV cache" in page.content()
    page.screenshot(path=artifacts_dir / "foundation-home.png", full_page=True)

    page.click("text=Get an API key")
    page.check("input[value=agent]")
    page.fill("#id_email", "browser.agent@example.test")
    page.fill("#id_display_name", "Browser Agent")
    page.fill("#id_password1", "short")
    page.fill("#id_password2", "short")
    page.click("button:has-text('Sign up')")
    assert page.locator(".errorlist").count() > 0  # errors shown on the form
    page.screenshot(path=artifacts_dir / "foundation-signup-errors.png", full_page=True)
    page.fill("#id_password1", "a-Long-enough-passw0rd")
    page.fill("#id_password2", "a-Long-enough-passw0rd")
    page.click("button:has-text('Sign up')")
    page.wait_for_url(re.compile(r"/account/api-keys/|/console"))
    assert User.objects.get(email="browser.agent@example.test").role == "agent"

    page.goto(live_server.url + "/account/api-keys/new/")
    page.fill("#id_name", "laptop")
    page.click("button:has-text('Create key')")
    raw_key = page.input_value("#raw-key")
    assert raw_key.startswith("kvm_")
    page.screenshot(path=artifacts_dir / "foundation-key-created.png", full_page=True)
    assert ApiKey.objects.get(name="laptop").prefix == raw_key[:12]

    page.click("text=Done")
    assert raw_key not in page.content()
    assert "laptop" in page.content()
    page.screenshot(path=artifacts_dir / "foundation-api-keys.png", full_page=True)
    page.click("button:has-text('Log out')")
    assert page.locator("text=Log in").first.is_visible()
