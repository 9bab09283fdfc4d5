"""``producer.http`` and ``producer.http.batch`` work on a base install: they never import
the broker, store or model libraries (each is blocked here, so importing one would fail)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
BLOCKED = ("celery", "kombu", "redis", "pyarrow", "torch", "onnxruntime")


def test_http_client_imports_without_broker_or_model_libraries() -> None:
    code = (
        "import sys\n"
        f"for name in {BLOCKED!r}:\n"
        "    sys.modules[name] = None  # 'import name' now raises ImportError\n"
        "import producer.http as h\n"
        "from producer.http import HttpClient, HttpJob, HttpBatch, BatchResult\n"
        "import producer.http.batch as hb\n"
        "from producer.http.batch import BatchProgress, RowResult\n"
        "assert h.HttpBatch is hb.HttpBatch and h.BatchResult is hb.BatchResult\n"
        "from shared.errors import AuthError, Busy, RateLimited, Unavailable\n"
        "c = HttpClient('http://127.0.0.1:9', 'k')\n"
        "c.close()\n"
    )
    assert_loads_nothing_blocked(code)


def test_http_batch_imports_on_its_own_without_broker_or_model_libraries() -> None:
    """``producer.http.batch`` imported first and alone works (no import cycle: it needs
    the client module for type checking only) and loads no blocked library."""
    code = (
        "import sys\n"
        f"for name in {BLOCKED!r}:\n"
        "    sys.modules[name] = None  # 'import name' now raises ImportError\n"
        "from producer.http.batch import BatchProgress, BatchResult, HttpBatch, RowResult\n"
        "import producer.http.client as client\n"
        "assert client.HttpBatch is HttpBatch\n"
    )
    assert_loads_nothing_blocked(code)


def assert_loads_nothing_blocked(code: str) -> None:
    """Run ``code`` in a fresh interpreter; it must load none of the blocked libraries."""
    code += (f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {BLOCKED!r}\n"
             "                 and sys.modules[m] is not None)\n"
             "print('loaded:', loaded)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "loaded: []", proc.stdout + proc.stderr
