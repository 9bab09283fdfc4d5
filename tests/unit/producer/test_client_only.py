"""The client-only install promise: the producer side never imports torch, ORT or workers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PRODUCER_MODULES = ["producer", "producer.client", "producer.bulk.batch", "producer.files.score",
                    "cli.main", "producer.files.readers", "producer.files.writers",
                    "api.app"]
FORBIDDEN = ("torch", "onnxruntime", "workers")


def run_python(*args: str, drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if k not in drop},
           "PYTHONPATH": str(ROOT), "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_producer_modules_import_without_worker_dependencies() -> None:
    code = (
        "import importlib, sys\n"
        f"for name in {PRODUCER_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print('loaded:', bad)\n"
    )
    proc = run_python("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "loaded: []", proc.stdout + proc.stderr


def test_cli_help_lists_every_command() -> None:
    proc = run_python("-m", "cli.main", "--help")
    assert proc.returncode == 0, proc.stderr
    # A command is the first word of a line in the commands table (boxed or plain).
    listed = set(re.findall(r"^[\W_]*([a-z]+) {2,}\S", proc.stdout, flags=re.MULTILINE))
    assert {"score", "worker", "demo", "status", "models", "api"} <= listed, proc.stdout


def test_api_key_command_stores_only_the_hash(tmp_path: Path) -> None:
    import json

    keys = tmp_path / "keys.json"
    proc = run_python("-m", "cli.main", "api-key", "--tenant", "acme", "--keys-file",
                      str(keys), "--rate-per-s", "7", "--queue-share", "0.25")
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    stored = json.loads(keys.read_text())["keys"]
    assert shown["api_key"].startswith("iq_") and shown["api_key"] not in keys.read_text()
    assert [(k["tenant"], k["rate_per_s"], k["queue_share"]) for k in stored] == \
        [("acme", 7, 0.25)]
    assert oct(keys.stat().st_mode & 0o777) == "0o600"


def test_api_refuses_the_embedded_default() -> None:
    proc = run_python("-m", "cli.main", "api", drop=("INFERQ_BROKER_URL",))
    assert proc.returncode == 2
    assert "INFERQ_BROKER_URL" in proc.stderr
