"""The compute side: Celery tasks, the dynamic batcher, model runtimes, the model toolkit."""
