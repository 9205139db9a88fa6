"""Forms for the publisher pages: a new document (paste or upload) and payout/top-up amounts.

Input checks only (shape, size, encoding, exactly one source of text); the business rules are
the services' (marketplace.services.documents.create_document validates again and its
ValidationErrors are put back on the form by the view).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError

from marketplace.services.documents import (
    DESCRIPTION_MAX,
    TITLE_MAX,
    UPLOAD_EXTENSIONS,
    decode_upload,
    model_choices,
)

NANO_PER_USD = Decimal(10**9)
MAX_PRICE_USD = Decimal(1000)


def usd_to_nano(value: Decimal) -> int:
    """Dollars to integer nano-USD; more than 9 decimals is refused by the form field."""
    return int((value * NANO_PER_USD).to_integral_value())


class DocumentCreateForm(forms.Form):
    title = forms.CharField(
        label="Title",
        max_length=TITLE_MAX,
        widget=forms.TextInput(attrs={"placeholder": "e.g. Moby-Dick, chapter 1"}),
    )
    description = forms.CharField(
        label="Description (optional)", required=False, max_length=DESCRIPTION_MAX,
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text="What the text is; shown in the catalogue. You can edit it later.",
    )
    text = forms.CharField(
        label="Paste the text",
        required=False,
        strip=False,
        widget=forms.Textarea(attrs={"rows": 10, "placeholder": "Paste the document here…"}),
    )
    file = forms.FileField(
        label="…or upload a .txt / .md file",
        required=False,
        widget=forms.ClearableFileInput(attrs={"accept": ",".join(UPLOAD_EXTENSIONS)}),
    )
    model = forms.ChoiceField(label="Model", choices=())
    price_per_load = forms.DecimalField(
        label="Price per load (USD)",
        required=False,
        min_value=Decimal(0),
        max_value=MAX_PRICE_USD,
        max_digits=15,
        decimal_places=9,
        widget=forms.NumberInput(attrs={"step": "any", "placeholder": "blank = tariff"}),
        help_text="Leave blank to use the tariff's cache-read price for the document's length.",
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        choices = model_choices()
        self.fields["model"].choices = choices
        if choices and not self.initial.get("model"):
            self.initial["model"] = choices[0][0]
        limit = settings.DOCUMENT_MAX_UPLOAD_BYTES
        self.fields["file"].help_text = (
            f"UTF-8 text, at most {limit:,} bytes. Give either pasted text or a file, not both."
        )

    def clean_file(self):
        upload = self.cleaned_data.get("file")
        if not upload:
            return None
        if upload.size > settings.DOCUMENT_MAX_UPLOAD_BYTES:
            raise ValidationError(
                f"The file is {upload.size:,} bytes; the limit is "
                f"{settings.DOCUMENT_MAX_UPLOAD_BYTES:,} bytes.",
                code="too_big",
            )
        data = upload.read()
        text = decode_upload(data=data, filename=upload.name or "")
        if not text.strip():
            raise ValidationError("The file is empty.", code="empty")
        return text  # the decoded text, not the upload

    def clean_price_per_load(self) -> int | None:
        value = self.cleaned_data.get("price_per_load")
        if value is None:
            return None
        try:
            return usd_to_nano(value)
        except (InvalidOperation, ValueError) as exc:  # pragma: no cover - the field checks
            raise ValidationError("Enter a price in dollars.", code="invalid") from exc

    def clean(self) -> dict:
        cleaned = super().clean()
        text = cleaned.get("text") or ""
        file_text = cleaned.get("file")
        file_given = bool(self.files.get(self.add_prefix("file")))
        if text.strip() and file_given:
            raise ValidationError(
                "Give the text either pasted or as a file, not both.", code="both"
            )
        if not text.strip() and not file_given:
            if text:
                self.add_error("text", ValidationError("The text is empty.", code="empty"))
            else:
                raise ValidationError("Paste the text or upload a file.", code="neither")
        if file_text:
            cleaned["document_text"] = file_text
        elif text.strip():
            cleaned["document_text"] = text
        return cleaned


class DocumentEditForm(forms.Form):
    """What a publisher may change once a document is listed: title, description, price."""

    title = forms.CharField(label="Title", max_length=TITLE_MAX)
    description = forms.CharField(
        label="Description", required=False, max_length=DESCRIPTION_MAX,
        widget=forms.Textarea(attrs={"rows": 4}),
        help_text="What the text is and what agents can ask about it (shown in the catalogue).",
    )
    price_per_load = forms.DecimalField(
        label="Price per load (USD)", required=False, min_value=Decimal(0),
        max_value=MAX_PRICE_USD, max_digits=15, decimal_places=9,
        widget=forms.NumberInput(attrs={"step": "any", "placeholder": "blank = tariff"}),
        help_text="Blank: the tariff's cache-read price. Licenses already sold keep their price.",
    )

    def clean_price_per_load(self) -> int | None:
        value = self.cleaned_data.get("price_per_load")
        return None if value is None else usd_to_nano(value)


class TopUpForm(forms.Form):
    amount = forms.DecimalField(
        label="Amount (USD)",
        min_value=Decimal("1.00"),
        max_value=Decimal("10000.00"),
        decimal_places=2,
        max_digits=8,
        initial=Decimal("10.00"),
        widget=forms.NumberInput(attrs={"step": "0.01"}),
        help_text="Paid through Stripe Checkout; your wallet is credited once Stripe confirms.",
    )

    @property
    def amount_cents(self) -> int:
        return int(self.cleaned_data["amount"] * 100)
