"""What producers and workers agree on: settings, schemas, the tensor codec, the Celery app."""
