"""The Celery app as a module attribute, for Celery's own tools and nothing else.

``celery -A shared.celery_main inspect ping``, ``celery -A shared.celery_main flower``:
the app is built from the ``INFERQ_*`` settings when this module is imported. inferq's
own code calls ``shared.celery_app.make_app`` instead, so importing it stays free.
"""

from shared.celery_app import make_app
from shared.settings import load_settings

app = make_app(load_settings())
