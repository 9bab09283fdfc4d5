"""The HTTP client: the SDK's verbs over the results API (``inferq api``) instead of the
broker. ``client.py`` has ``HttpClient`` and ``HttpJob``, ``batch.py`` the batch side,
``wire.py`` the JSON/NDJSON encoding and the error answers. Works on a base install."""

from producer.http.batch import BatchProgress, BatchResult, HttpBatch, RowResult
from producer.http.client import HttpClient, HttpJob, ModelInfo
from producer.http.wire import BLOCK_ROWS, ApiError

__all__ = ["BLOCK_ROWS", "ApiError", "BatchProgress", "BatchResult", "HttpBatch",
           "HttpClient", "HttpJob", "ModelInfo", "RowResult"]
