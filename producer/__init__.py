"""The client side: the SDK, bulk scoring, the CLI. Imports ``shared`` only."""

from producer.client import Client, Job

__all__ = ["Client", "Job"]
