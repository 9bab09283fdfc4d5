"""Models in a bucket, end to end, over the real S3 protocol (moto's standalone server):
published with the CLI, served by a worker with no local models, scored by a producer with
no model folder, a corrupted object refused by its sha256, a default moved in the bucket
picked up by the running worker."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import client_for, run_cli, wait_until
from tests.moto_server import moto_server

pytestmark = pytest.mark.integration
boto3 = pytest.importorskip("boto3")


@pytest.fixture
def s3(tmp_path: Path):
    with moto_server(tmp_path / "moto.log") as aws:
        yield aws


def test_models_in_a_bucket_serve_a_producer_with_no_model_folder(
        redis_env, s3, start_worker, digits, model_repo, tmp_path, monkeypatch):
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    bucket = f"inferq-models-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    shared = {**redis_env, **s3, "INFERQ_MODEL_REPO": f"s3://{bucket}/models",
              "INFERQ_MODEL_REFRESH_S": "1"}
    builder = {**shared, "INFERQ_HOME": str(tmp_path / "builder")}
    worker_env = {**shared, "INFERQ_HOME": str(tmp_path / "worker")}
    producer = {**shared, "INFERQ_HOME": str(tmp_path / "producer")}

    # Publish: the fp32 model and an int8 variant of it, through the CLI.
    calibration = tmp_path / "calibration.npy"
    np.save(calibration, digits["x"][:300])
    proc = run_cli(["compress", str(model_repo / "digits" / "1" / "model.onnx"),
                    "--calibration", str(calibration), "--method", "int8-dynamic",
                    "--name", "digits"], builder, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert {"models/digits/1/manifest.json", "models/digits/1/model.onnx",
            "models/digits/2/manifest.json", "models/digits/2/model.onnx"} <= keys
    int8_key = "models/digits/2/model.onnx"
    int8 = client.get_object(Bucket=bucket, Key=int8_key)["Body"].read()
    client.put_object(Bucket=bucket, Key=int8_key, Body=int8[:-64] + b"\0" * 64)

    # A worker with no local models serves what the bucket holds.
    worker = start_worker(worker_env)
    src, out = tmp_path / "x.npy", tmp_path / "scores.parquet"
    np.save(src, digits["x"])
    proc = run_cli(["score", "--model", "digits", "-i", str(src), "-o", str(out),
                    "--chunk-rows", "1000", "--stall-timeout", "60"], producer)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pq.read_table(out).to_pydict()
    assert table["row"] == list(range(10_000))
    np.testing.assert_array_equal(table["label"], digits["label"])

    # The corrupted int8 object is refused by its sha256; the worker goes on.
    sdk = client_for(producer)
    failed = sdk.wait(sdk.submit("digits:int8", {"image": digits["x"][:2]}).id, timeout=60)
    assert failed.status.value == "failed"
    assert "sha256" in (failed.error or "") and "digits/2/model.onnx" in (failed.error or "")
    client.put_object(Bucket=bucket, Key=int8_key, Body=int8)  # restored
    restored = sdk.wait(sdk.submit("digits:int8", {"image": digits["x"][:2]}).id, timeout=60)
    assert restored.status.value == "succeeded" and restored.version == 2

    # A default moved in the bucket reaches the running worker, no restart.
    proc = run_cli(["models", "default", "digits", "int8"], producer)
    assert proc.returncode == 0 and "digits now serves digits@2" in proc.stdout, proc.stderr

    def serves_int8() -> bool:
        result = sdk.wait(sdk.submit("digits", {"image": digits["x"][:1]}).id, timeout=60)
        return result.version == 2

    wait_until(serves_int8, 30, "the new default served", pause=0.5)
    assert worker.proc.poll() is None

    # Artifacts were downloaded by the worker only; the producer holds manifests.
    cached = {p.name for p in (tmp_path / "worker" / "model-cache").rglob("*.onnx")}
    assert cached == {"model.onnx"}
    assert len(list((tmp_path / "worker" / "model-cache").rglob("model.onnx"))) == 2
    assert not list((tmp_path / "producer").rglob("*.onnx"))
