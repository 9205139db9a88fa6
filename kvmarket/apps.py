from django.contrib.admin.apps import AdminConfig


class KvmarketAdminConfig(AdminConfig):
    """Django's admin with kvmarket's site (staff only) and the accounts registered."""

    default_site = "kvmarket.admin_site.KvmarketAdminSite"

    def ready(self) -> None:
        super().ready()  # autodiscovers every app's admin.py first
        from kvmarket import admin  # noqa: F401  (registers accounts unless an app already did)
