"""The CLI as a user runs it: demo, score with progress, resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import redis

from producer.bulk.batch import chunk_id
from tests.conftest import ROOT, run_cli, wait_until

pytestmark = pytest.mark.integration


def test_demo_runs_embedded_with_no_broker(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env.update(INFERQ_HOME=str(tmp_path / "home"), INFERQ_MODEL_REPO=str(tmp_path / "models"),
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "cli.main", "demo"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    accuracy = float(out.split("accuracy ")[1].split()[0])
    assert accuracy >= 0.97, out
    assert "scored 1,797 digits" in out and "rows/s" in out
    predictions = tmp_path / "home" / "demo" / "digits-predictions.parquet"
    assert pq.read_table(predictions).num_rows == 1797
    assert list((tmp_path / "home" / "results").iterdir())  # the persistent local store


def test_score_npy_to_parquet_in_order(redis_env, start_worker, digits, tmp_path):
    start_worker(redis_env)
    src = tmp_path / "x.npy"
    np.save(src, digits["x"].reshape(len(digits["x"]), 64))  # flat rows are reshaped
    out = tmp_path / "preds.parquet"
    proc = run_cli(["score", "--model", "digits", "--input", str(src), "--output", str(out),
                    "--chunk-rows", "700", "--stall-timeout", "60"], redis_env)
    assert proc.returncode == 0, proc.stderr
    assert "10,000 rows (0 failed)" in proc.stderr and "rows/s" in proc.stderr
    table = pq.read_table(out).to_pydict()
    assert table["row"] == list(range(10_000))
    np.testing.assert_array_equal(table["label"], digits["label"])
    assert all(e is None for e in table["error"])
    assert not out.with_name(out.name + ".inferq.json").exists()


def test_bad_csv_rows_fail_alone(redis_env, start_worker, digits, tmp_path):
    start_worker(redis_env)
    flat = digits["x"][:20].reshape(20, 64)
    lines = [",".join(f"p{i}" for i in range(64))]
    lines += [",".join(str(int(v)) for v in row) for row in flat]
    cells = lines[4].split(",")  # data row 3
    cells[5] = "abc"
    lines[4] = ",".join(cells)
    lines[8] = ",".join(lines[8].split(",")[:63])  # data row 7: a value short
    src = tmp_path / "x.csv"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "preds.jsonl"
    proc = run_cli(["score", "--model", "digits", "-i", str(src), "-o", str(out),
                    "--no-progress", "--stall-timeout", "60"], redis_env)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in rows] == list(range(20))
    errors = {r["row"]: r["error"] for r in rows if r["error"]}
    assert sorted(errors) == [3, 7]
    assert "row 3" in errors[3] and "p5" in errors[3] and "'abc'" in errors[3]
    assert "row 7" in errors[7] and "64" in errors[7] and "63" in errors[7]
    good = [r for r in rows if not r["error"]]
    assert [r["label"] for r in good] == [int(digits["label"][r["row"]]) for r in good]


def test_missing_input_and_unknown_model_are_clear(redis_env, tmp_path):
    proc = run_cli(["score", "--model", "digits", "-i", str(tmp_path / "nope.npy"),
                    "-o", str(tmp_path / "o.parquet")], redis_env)
    assert proc.returncode == 2 and "nope.npy does not exist" in proc.stderr
    src = tmp_path / "x.npy"
    np.save(src, np.zeros((3, 64), np.float32))
    proc = run_cli(["score", "--model", "nope", "-i", str(src), "-o", str(tmp_path / "o.csv")],
                   redis_env)
    assert proc.returncode == 2 and "unknown model 'nope'" in proc.stderr


def _one_clear_line(proc: subprocess.CompletedProcess[str], code: int, *says: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and all(s in lines[0] for s in says), lines


@pytest.mark.parametrize("broker", ["redis://user:s3cret@127.0.0.1:1/0",
                                    "amqp://guest:s3cret@127.0.0.1:1//"])
def test_a_wrong_broker_url_is_one_line_at_once(redis_env, tmp_path, broker):
    src = tmp_path / "x.npy"
    np.save(src, np.zeros((3, 64), np.float32))
    env = {**redis_env, "INFERQ_BROKER_URL": broker}
    started = time.monotonic()
    proc = run_cli(["score", "--model", "digits", "-i", str(src), "-o",
                    str(tmp_path / "o.parquet"), "--no-progress"], env, timeout=60)
    _one_clear_line(proc, 3, "broker", "127.0.0.1:1", "INFERQ_BROKER_URL")
    assert "s3cret" not in proc.stderr
    assert time.monotonic() - started < 15  # not Celery's ~20 s of reconnect lines
    env = {**redis_env, "INFERQ_RESULT_BACKEND": "redis://127.0.0.1:1/0"}
    proc = run_cli(["score", "--model", "digits", "-i", str(src), "-o",
                    str(tmp_path / "o.parquet"), "--no-progress"], env, timeout=60)
    _one_clear_line(proc, 3, "result store", "INFERQ_RESULT_BACKEND")


@pytest.mark.parametrize(("name", "content"), [
    ("empty.npy", np.zeros((0, 64), np.float32)), ("zero-bytes.npy", b""),
    ("empty.csv", b""), ("header-only.csv", b"a,b\n"), ("empty.jsonl", b"")])
def test_an_input_with_no_rows_is_one_line_and_no_output(redis_env, tmp_path, name, content):
    src = tmp_path / name
    if isinstance(content, bytes):
        src.write_bytes(content)
    else:
        np.save(src, content)
    out = tmp_path / "o.parquet"
    proc = run_cli(["score", "--model", "digits", "-i", str(src), "-o", str(out),
                    "--no-progress"], redis_env)
    _one_clear_line(proc, 2, name)
    assert not out.exists()


def test_a_missing_model_repository_names_its_setting(redis_env, tmp_path):
    """Run outside the clone, the default relative ``models`` folder is not there."""
    env = {k: v for k, v in redis_env.items() if k != "INFERQ_MODEL_REPO"}
    src = tmp_path / "x.npy"
    np.save(src, np.zeros((3, 64), np.float32))
    full_env = {k: v for k, v in os.environ.items() if k != "INFERQ_MODEL_REPO"}
    proc = subprocess.run([sys.executable, "-m", "cli.main", "score", "--model", "digits",
                           "-i", str(src), "-o", str(tmp_path / "o.parquet"), "--no-progress"],
                          env={**full_env, **env, "PYTHONPATH": str(ROOT)}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    _one_clear_line(proc, 2, f"{tmp_path.resolve() / 'models'} (INFERQ_MODEL_REPO) does not "
                    "exist", "set INFERQ_MODEL_REPO")


def _finished(env: dict[str, str], batch_id: str, chunks: int = 40) -> int:
    """Chunks of the batch with a stored result (by id: a SCAN of a database that earlier
    tests filled took longer than this test's whole run)."""
    r = redis.Redis.from_url(env["INFERQ_RESULT_BACKEND"])
    keys = [f"celery-task-meta-{chunk_id(batch_id, i)}" for i in range(chunks)]
    return int(r.exists(*keys))


def test_interrupt_and_resume_does_not_redo_finished_chunks(redis_env, start_worker, digits,
                                                            tmp_path):
    # One 250-row chunk per model call, each 60 ms late: ~2.4 s to interrupt in.
    start_worker({**redis_env, "INFERQ_FAULT_INJECTION": "delay_ms=60",
                  "INFERQ_MAX_BATCH_ROWS": "250"}, "--concurrency", "2")
    src = tmp_path / "x.npy"
    np.save(src, digits["x"])
    out = tmp_path / "preds.parquet"
    args = ["score", "--model", "digits", "-i", str(src), "-o", str(out), "--chunk-rows",
            "250", "--stall-timeout", "60"]
    env = {**os.environ, **redis_env, "PYTHONPATH": str(ROOT)}
    # SIGINT as a terminal leaves it: a suite started in the background (`cmd &` in a
    # script, as CI may) has it ignored, and a child inherits that (the run then ignored
    # the interrupt and finished with 0).
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    state = out.with_name(out.name + ".inferq.json")

    def eight_finished() -> bool:
        assert proc.poll() is None, f"the run ended before it was interrupted: {proc.stderr}"
        return state.exists() and _finished(
            redis_env, json.loads(state.read_text())["batch_id"]) >= 8

    wait_until(eight_finished, 60, "8 chunks finished")
    os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and not out.exists()
    proc = run_cli([*args, "--resume"], redis_env)
    assert proc.returncode == 0, proc.stderr
    reused = int(proc.stderr.split(" chunks sent, ")[1].split()[0])
    assert reused >= 8, proc.stderr
    table = pq.read_table(out).to_pydict()
    assert table["row"] == list(range(10_000))
    np.testing.assert_array_equal(table["label"], digits["label"])


def test_models_list_piped_is_plain_and_whole_and_json_for_programs(model_repo):
    env = {"INFERQ_MODEL_REPO": str(model_repo)}
    proc = run_cli(["models", "list"], env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["version", "variant", "runtime"]
    assert "…" not in proc.stdout and "│" not in proc.stdout
    assert any(line.startswith("digits@1") for line in lines), proc.stdout
    proc = run_cli(["models", "list", "--json"], env)
    records = json.loads(proc.stdout)
    assert {r["version"] for r in records} >= {"digits@1"}
    assert sum(r["serves"] for r in records if r["version"].startswith("digits@")) == 1


@pytest.mark.parametrize("suffix", [".npy", ".csv", ".jsonl", ".parquet"])
def test_example_input_for_digits_is_read_back_row_for_row(tmp_path, digits, model_repo,
                                                           suffix):
    from producer.files.readers import read_chunks
    from shared.repository import ModelRepository

    path = tmp_path / f"X{suffix}"
    proc = run_cli(["example-input", "digits", "--output", str(path), "--rows", "2000"], {})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == f"wrote 2,000 digits inputs to {path}"
    spec = ModelRepository(model_repo).resolve("digits").manifest.input()
    chunks = list(read_chunks(path, spec, 512))
    assert sum(c.rows for c in chunks) == 2000 and not any(c.errors for c in chunks)
    rows = np.concatenate([c.data for c in chunks]).reshape(2000, -1)
    tiled = np.resize(digits["x"], (2000, 1, 8, 8)).reshape(2000, -1)
    np.testing.assert_array_equal(rows, tiled)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv", ".parquet"])
def test_example_input_for_minilm_is_read_back_row_for_row(tmp_path, bundled_repo, suffix):
    from producer.files.text import read_text_chunks
    from shared.repository import ModelRepository

    path = tmp_path / f"S{suffix}"
    assert run_cli(["example-input", "minilm", "--output", str(path), "--rows", "30"],
                   {}).returncode == 0
    spec = ModelRepository(bundled_repo).resolve("minilm").manifest.input()
    texts = [t for c in read_text_chunks(path, spec, 8) for t in c.data]
    assert len(texts) == 30 and all(isinstance(t, str) and t for t in texts)


def test_the_readme_batch_quickstart_runs_as_pasted(tmp_path, model_repo):
    """`inferq example-input` then `inferq score`, embedded (no broker)."""
    env = {"INFERQ_MODEL_REPO": str(model_repo), "INFERQ_HOME": str(tmp_path / "home")}
    assert run_cli(["example-input", "digits", "--output", "X.npy", "--rows", "300"], env,
                   cwd=tmp_path).returncode == 0
    proc = run_cli(["score", "--model", "digits", "--input", "X.npy", "--output",
                    "preds.parquet"], env, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert pq.read_table(tmp_path / "preds.parquet").num_rows == 300


@pytest.mark.parametrize("args, problem", [
    (["nope", "--output", "X.npy"], "model: no example input for 'nope'"),
    (["digits", "--output", "X.txt"], "output: digits inputs are written as"),
    (["digits", "--output", "X.npy", "--rows", "0"], "rows: must be at least 1"),
])
def test_example_input_refuses_in_one_line(tmp_path, args, problem):
    proc = run_cli(["example-input", *args], {}, cwd=tmp_path)
    assert proc.returncode == 2 and problem in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
