"""Forms for sign-up and API keys (login and password change use Django's own forms)."""

from __future__ import annotations

from django import forms
from django.contrib.auth import password_validation
from django.contrib.auth.forms import AuthenticationForm

from marketplace.models import Role, User


class SignUpForm(forms.Form):
    role = forms.ChoiceField(
        label="I am",
        choices=[
            (Role.PUBLISHER.value, "A publisher — I list documents and earn per load"),
            (Role.AGENT.value, "An agent — I buy loads and call the API"),
        ],
        widget=forms.RadioSelect,
    )
    email = forms.EmailField(
        label="Email address", widget=forms.EmailInput(attrs={"autocomplete": "email"})
    )
    display_name = forms.CharField(label="Display name", max_length=120, required=False)
    password1 = forms.CharField(
        label="Password",
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
        help_text=password_validation.password_validators_help_text_html(),
    )
    password2 = forms.CharField(
        label="Password again",
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
    )

    def clean_email(self) -> str:
        email = User.objects.normalize_email(self.cleaned_data["email"]).lower()
        if User.objects.filter(email__iexact=email).exists():
            raise forms.ValidationError("An account with this email address already exists.")
        return email

    def clean(self) -> dict:
        cleaned = super().clean()
        password1, password2 = cleaned.get("password1"), cleaned.get("password2")
        if password1 and password2 and password1 != password2:
            self.add_error("password2", "The two passwords do not match.")
        elif password1:
            candidate = User(
                email=cleaned.get("email", ""), display_name=cleaned.get("display_name", "")
            )
            try:
                password_validation.validate_password(password1, candidate)
            except forms.ValidationError as exc:
                self.add_error("password1", exc)
        return cleaned

    @property
    def role_value(self) -> Role:
        return Role(self.cleaned_data["role"])


class EmailAuthenticationForm(AuthenticationForm):
    """Django's login form; the username field is the email address."""

    username = forms.EmailField(
        label="Email address",
        widget=forms.EmailInput(attrs={"autofocus": True, "autocomplete": "email"}),
    )

    def clean_username(self) -> str:
        return self.cleaned_data["username"].strip().lower()


class ApiKeyCreateForm(forms.Form):
    name = forms.CharField(
        label="Key name",
        max_length=80,
        help_text="A label for you, e.g. the agent or environment that uses the key.",
        widget=forms.TextInput(attrs={"placeholder": "production agent"}),
    )
