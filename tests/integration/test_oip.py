"""Open Inference Protocol (KServe v2) on a real ``inferq api`` and worker, spoken by the
real ``tritonclient[http]`` package: health, metadata, infer (binary and JSON tensors),
errors, and inferq's asynchronous extension. Outputs equal the model run in process."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

tritonclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.integration

KEY = {"Authorization": "Bearer oip-key"}


def key() -> dict[str, str]:
    """A fresh dict per call: tritonclient adds its own headers to the one it is given."""
    return dict(KEY)


@pytest.fixture
def served(redis_env, start_worker, start_api):  # noqa: ANN201
    env = {**redis_env, "INFERQ_API_KEYS": "acme:oip-key"}
    start_worker(env)
    api = start_api(env)
    client = tritonclient.InferenceServerClient(api.url.removeprefix("http://"))
    yield api, client
    client.close()


def _infer(client, x: np.ndarray, binary: bool, version: str = "",  # noqa: ANN001
           outputs: list[str] | None = None):  # noqa: ANN202
    tensor = tritonclient.InferInput("image", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    wanted = [tritonclient.InferRequestedOutput(n, binary_data=binary) for n in outputs or []]
    return client.infer("digits", [tensor], model_version=version, outputs=wanted or None,
                        headers=key(), request_id="r-1")


def test_tritonclient_gets_metadata_and_the_models_outputs(served, digits) -> None:
    api, client = served
    assert client.is_server_live() and client.is_server_ready()
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata("digits", headers=key())
    assert meta["name"] == "digits" and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {
        "label": "INT64", "probabilities": "FP32"}
    assert client.is_model_ready("digits", headers=key())

    x = digits["x"][:16]
    for binary in (True, False):  # tritonclient's default (binary tensors), then JSON
        result = _infer(client, x, binary)
        np.testing.assert_array_equal(result.as_numpy("label"), digits["label"][:16])
        np.testing.assert_allclose(result.as_numpy("probabilities"),
                                   digits["probabilities"][:16], rtol=1e-5, atol=1e-7)
        assert result.get_response()["id"] == "r-1"
    # One named output, on a pinned version.
    result = _infer(client, x[:3], True, version=meta["versions"][-1], outputs=["label"])
    np.testing.assert_array_equal(result.as_numpy("label"), digits["label"][:3])
    assert result.as_numpy("probabilities") is None


def test_bad_requests_get_one_clear_error(served, digits) -> None:
    api, client = served
    x = digits["x"][:2]
    wrong = tritonclient.InferInput("pixels", list(x.shape), "FP32")
    wrong.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="no input 'pixels'.*image"):
        client.infer("digits", [wrong], headers=key())
    narrow = tritonclient.InferInput("image", [2, 16], "FP32")
    narrow.set_data_from_numpy(np.ascontiguousarray(x.reshape(2, 64)[:, :16]))
    with pytest.raises(InferenceServerException, match="image"):
        client.infer("digits", [narrow], headers=key())
    with pytest.raises(InferenceServerException, match="no model|unknown model|nosuch"):
        client.get_model_metadata("nosuch", headers=key())
    with pytest.raises(InferenceServerException, match="API key"):
        client.get_model_metadata("digits")  # no key
    # A binary header that claims more than the body holds: 422, never a 500.
    r = httpx.post(api.url + "/v2/models/digits/infer", headers={
        **KEY, "Inference-Header-Content-Length": "999"}, content=b"{}")
    assert r.status_code == 422 and "Inference-Header-Content-Length" in r.json()["error"]
    r = httpx.post(api.url + "/v2/models/digits/infer", headers=KEY, content=b"[" * 100_000)
    assert r.status_code == 422 and "error" in r.json()


def test_async_extension_answers_a_job_id_then_the_response(served, digits) -> None:
    api, _ = served
    x = digits["x"][:4]
    body = {"parameters": {"async": True},
            "inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape),
                        "data": x.reshape(-1).tolist()}]}
    r = httpx.post(api.url + "/v2/models/digits/infer", headers=KEY, json=body)
    assert r.status_code == 202, r.text
    location = r.json()["location"]
    assert r.headers["location"] == location == f"/v2/jobs/{r.json()['id']}"
    done = httpx.get(api.url + location, params={"wait": "20s"}, headers=KEY, timeout=30)
    assert done.status_code == 200, done.text
    outputs = {o["name"]: o for o in done.json()["outputs"]}
    assert outputs["label"]["data"] == digits["label"][:4].tolist()
    assert outputs["probabilities"]["shape"] == [4, 10]
    # Another tenant's key cannot read it.
    assert httpx.get(api.url + location, headers={"Authorization": "Bearer nope"}
                     ).status_code == 401
