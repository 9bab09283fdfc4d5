"""The producer's peak memory while ``inferq score`` streams a big .npy through the queue."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.config import ROOT
from bench.procs import proc_status_kb
from bench.score_child import MARK


@dataclass
class ScoreRun:
    rows: int
    seconds: float  # the whole subprocess, Python start-up included
    reported_rows_per_s: float | None  # what `inferq score` printed for its pipeline
    peak_rss_mb: float | None  # VmHWM the child printed as it exited: its exact peak
    polled_mb: dict[str, float]  # highest VmHWM, RssAnon, RssFile read from /proc while it ran
    cpu_seconds: float
    returncode: int
    stderr_tail: str


def score_subprocess(ref: str, source: Path, output: Path, env: dict[str, str],
                     rows: int, timeout: float) -> ScoreRun:
    """Run ``inferq score`` as a child and read its peak RSS (VmHWM) and CPU time."""
    log = output.with_suffix(".stderr")
    cmd = [sys.executable, "-m", "bench.score_child", "score", "--model", ref, "--input",
           str(source), "--output", str(output), "--no-progress", "--stall-timeout", "60"]
    started = time.perf_counter()
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
        polled: dict[str, int] = {}
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                break
            for field in ("VmHWM", "RssAnon", "RssFile"):
                polled[field] = max(polled.get(field, 0), proc_status_kb(proc.pid, field) or 0)
            time.sleep(0.05)  # sampling /proc: nothing to wait on
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    seconds = time.perf_counter() - started
    text = log.read_text(errors="replace")
    rate = re.search(r"= ([\d,]+) rows/s", text)
    peak = re.search(MARK + r"(\d+)", text)
    return ScoreRun(rows, seconds, float(rate.group(1).replace(",", "")) if rate else None,
                    int(peak.group(1)) / 1024 if peak else None,
                    {k: round(v / 1024, 1) for k, v in polled.items()},
                    usage.ru_utime + usage.ru_stime, proc.returncode, text[-2000:])
