"""What a run measures: models, sizes (quick or full), and the INFERQ_* settings shared by
the bench process and every worker it starts."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
QUEUE_PREFIX = "bench."

# model name -> the reference every mode uses (the variant the worker serves).
MODELS = {"digits": "digits:fp32", "minilm": "minilm:int8"}
# Batch sizes tried for the in-process limit; the best one is the limit.
LIMIT_BATCHES = {"digits": (64, 128, 256, 512), "minilm": (16, 32, 64)}
ONLINE_CONCURRENCY = (1, 16, 64)


@dataclass(frozen=True)
class Sizes:
    limit_rows: dict[str, int]  # rows run per batch size when measuring the limit
    bulk_rows: dict[str, int]
    naive_rows: dict[str, int]
    online_seconds: float
    score_rows: int  # producer-memory file (digits)
    warmup_rows: dict[str, int] = field(default_factory=lambda: {"digits": 4096, "minilm": 64})


QUICK = Sizes(limit_rows={"digits": 60_000, "minilm": 256},
              bulk_rows={"digits": 400_000, "minilm": 2_000},
              naive_rows={"digits": 2_000, "minilm": 300},
              online_seconds=2.0, score_rows=200_000)
FULL = Sizes(limit_rows={"digits": 400_000, "minilm": 1_024},
             bulk_rows={"digits": 1_000_000, "minilm": 8_000},
             naive_rows={"digits": 8_000, "minilm": 1_000},
             online_seconds=10.0, score_rows=1_000_000)


@dataclass(frozen=True)
class BenchEnv:
    """The settings every process of a run shares, as INFERQ_* variables."""

    model_repo: Path
    home: Path
    ort_threads: int
    values: dict[str, str]

    @classmethod
    def create(cls, model_repo: Path, home: Path) -> BenchEnv:
        threads = int(os.environ.get("INFERQ_ORT_THREADS") or "1")
        if threads < 1:
            raise SystemExit("INFERQ_ORT_THREADS: use a thread count >= 1 for the bench "
                             "(0 = all cores would make the limit and workers disagree)")
        values = {
            "INFERQ_BROKER_URL": REDIS_URL,
            "INFERQ_RESULT_BACKEND": REDIS_URL,
            "INFERQ_MODEL_REPO": str(model_repo),
            "INFERQ_HOME": str(home),
            "INFERQ_QUEUE_PREFIX": QUEUE_PREFIX,
            "INFERQ_ORT_THREADS": str(threads),
        }
        return cls(model_repo, home, threads, values)

    def process_env(self, **extra: str) -> dict[str, str]:
        """The environment of a subprocess: ours, these settings, the repo importable."""
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        return {**os.environ, **self.values, "PYTHONPATH": path, **extra}

    def settings_overrides(self) -> dict[str, str]:
        prefix = "INFERQ_"
        return {k[len(prefix):].lower(): v for k, v in self.values.items()}


def model_repo() -> Path:
    """INFERQ_MODEL_REPO when set, else bench/.models (built on first use)."""
    configured = os.environ.get("INFERQ_MODEL_REPO")
    return Path(configured).resolve() if configured else BENCH_DIR / ".models"


def ensure_models(repo: Path, names: list[str]) -> None:
    """Build the bundled models the run needs into ``repo`` unless they are there."""
    from shared.repository import ModelRepository

    missing = [n for n in names if not ModelRepository(repo).versions(n)]
    if not missing:
        return
    if os.environ.get("INFERQ_MODEL_REPO"):
        raise SystemExit(f"INFERQ_MODEL_REPO={repo} lacks {', '.join(missing)}; build them "
                         "with `inferq models build` or unset it to use bench/.models")
    from workers.build.bundled import build_bundled

    print(f"building {', '.join(missing)} into {repo} (once) ...", flush=True)
    repo.mkdir(parents=True, exist_ok=True)
    build_bundled(repo, missing, if_missing=True)
