"""``producer.http`` works on a base install: it never imports the broker, store or model
libraries (each is blocked here, so importing one would fail)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("celery", "kombu", "redis", "pyarrow", "torch", "onnxruntime")


def test_http_client_imports_without_broker_or_model_libraries() -> None:
    code = (
        "import sys\n"
        f"for name in {BLOCKED!r}:\n"
        "    sys.modules[name] = None  # 'import name' now raises ImportError\n"
        "import producer.http as h\n"
        "from producer.http import HttpClient, HttpJob, HttpBatch, BatchResult\n"
        "from shared.errors import AuthError, Busy, RateLimited, Unavailable\n"
        "c = HttpClient('http://127.0.0.1:9', 'k')\n"
        "c.close()\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {BLOCKED!r}\n"
        "                 and sys.modules[m] is not None)\n"
        "print('loaded:', loaded)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "loaded: []", proc.stdout + proc.stderr
