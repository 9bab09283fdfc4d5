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

from shared.errors import InputError, ModelNotFound
from tests.conftest import client_for, run_cli, wait_until
from tests.moto_server import moto_server

pytestmark = pytest.mark.integration
boto3 = pytest.importorskip("boto3")


@pytest.fixture
def s3(tmp_path: Path):
    with moto_server(tmp_path / "moto.log") as aws:
        yield aws


@pytest.mark.parametrize("broker", ["redis", "sqs"])
def test_models_in_a_bucket_serve_a_producer_with_no_model_folder(
        broker, redis_env, s3, start_worker, digits, model_repo, tmp_path, monkeypatch):
    bucket = f"inferq-models-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"],
                          aws_access_key_id=s3["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=s3["AWS_SECRET_ACCESS_KEY"],
                          region_name=s3["AWS_DEFAULT_REGION"])
    client.create_bucket(Bucket=bucket)
    queues = dict(redis_env)
    if broker == "sqs":  # the same moto server speaks SQS; the results stay on Redis
        pytest.importorskip("pycurl")
        queues.update(INFERQ_BROKER_URL="sqs://", **s3)
        for key, value in s3.items():  # the SDK in this process sends through SQS
            monkeypatch.setenv(key, value)
    in_bucket = {**queues, **s3, "INFERQ_MODEL_REPO": f"s3://{bucket}/models",
                 "INFERQ_MODEL_REFRESH_S": "1"}
    builder = {**in_bucket, "INFERQ_HOME": str(tmp_path / "builder")}
    worker_env = {**in_bucket, "INFERQ_HOME": str(tmp_path / "worker")}
    # The producer host: the broker and the result store; no models, no bucket access
    # (on Redis no AWS credentials at all).
    producer = {**queues, "INFERQ_MODEL_REPO": str(tmp_path / "no-such-folder"),
                "INFERQ_HOME": str(tmp_path / "producer")}

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
                    "--stall-timeout", "60"], producer)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"\n{broker}: {proc.stderr.strip().splitlines()[-1]}")
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

    # The producer validates against the catalog the worker keeps in the result store.
    with pytest.raises(InputError, match="image"):
        sdk.submit("digits", {"image": np.zeros((1, 3, 3), np.float32)})
    with pytest.raises(ModelNotFound, match="unknown model 'nope' in the model catalog"):
        sdk.submit("nope", {"image": digits["x"][:1]})

    # A default moved in the bucket reaches the running worker, no restart.
    proc = run_cli(["models", "default", "digits", "int8"], builder)
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
    assert client_for(producer).model("digits")[0].key == "digits@2"  # the catalog moved too
