import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kvmarket.settings")
application = get_wsgi_application()

# Before the first request, not during it: the first token counter imports torch and
# transformers, and the process serves nothing while it does.
from marketplace.engine import load_token_counters  # noqa: E402 - needs the app set up

load_token_counters()
