"""The admin site: staff only."""

from django.contrib import admin
from django.http import HttpRequest


class KvmarketAdminSite(admin.AdminSite):
    site_header = "kvmarket administration"
    site_title = "kvmarket admin"
    index_title = "Operations"

    def has_permission(self, request: HttpRequest) -> bool:
        user = request.user
        return bool(user.is_active and user.is_staff)
