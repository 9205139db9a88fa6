"""Stripe webhook and other non-API ledger endpoints (mounted at /stripe/)."""

from django.urls import path

from ledger import views

urlpatterns = [path("webhook", views.stripe_webhook, name="stripe-webhook")]
