"""Browser pages."""

from django.urls import path

from marketplace.views import accounts as account_views

urlpatterns = [
    path("", account_views.home, name="home"),
]
