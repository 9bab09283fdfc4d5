"""msgpack and .npy job bodies, and msgpack answers, through the real app and a real
worker: the same outputs as the model in process; every malformed body one 422 line."""

from __future__ import annotations

import io

import msgpack
import numpy as np
import pytest

from tests.integration.test_api import assert_outputs, assert_problem, rows, serve

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

MSGPACK = {"Content-Type": "application/msgpack"}
NPY = {"Content-Type": "application/x-npy"}
JOBS = "/v1/models/digits/jobs"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def npy(arr: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, arr)
    return out.getvalue()


async def test_msgpack_and_npy_bodies_give_the_models_outputs(redis_env, start_worker, digits):
    start_worker(redis_env)
    async with serve(redis_env) as api:
        body = msgpack.packb({"inputs": rows(digits, slice(0, 3)), "priority": "high"})
        r = await api.post(JOBS, content=body, params={"wait": "30s"},
                           headers={**MSGPACK, "Accept": "application/msgpack"})
        assert r.status_code == 200, r.content
        assert r.headers["content-type"] == "application/msgpack"
        view = msgpack.unpackb(r.content)
        assert view["status"] == "succeeded"
        assert_outputs(view["outputs"], digits, slice(0, 3))

        r = await api.post(JOBS, content=npy(digits["x"][3:8]), headers=NPY,
                           params={"wait": "30s", "priority": "high", "expires_in": "60"})
        assert r.status_code == 200, r.text  # JSON back: no msgpack in Accept
        assert_outputs(r.json()["outputs"], digits, slice(3, 8))

        r = await api.post(JOBS, content=npy(digits["x"][8]), headers=NPY)  # one row, no wait
        assert r.status_code == 202, r.text
        location = r.json()["location"]
        r = await api.get(location, params={"wait": "30s"},
                          headers={"Accept": "application/msgpack, application/json"})
        assert r.headers["content-type"] == "application/msgpack"
        assert_outputs(msgpack.unpackb(r.content)["outputs"], digits, slice(8, 9))


@pytest.mark.parametrize(("headers", "body", "params", "words"), [
    (MSGPACK, msgpack.packb({"inputs": [0.0] * 64})[:-5], {}, ("body", "msgpack")),
    (MSGPACK, msgpack.packb([[0.0] * 64]), {}, ("body", "map")),
    (MSGPACK, msgpack.packb({"inputs": [0.0] * 64, "priority": "urgent"}), {},
     ("priority",)),
    (MSGPACK, msgpack.packb({"inputs": [0.0] * 5}), {}, ("image",)),
    (MSGPACK, msgpack.packb({"inputs": [0.0] * 64}), {"priority": "high"}, ("priority",)),
    (MSGPACK, b"\x91" * 100_000, {}, ("body", "msgpack")),  # nested 100,000 deep
    (NPY, npy(np.zeros(64, np.float32))[:40], {}, ("body", ".npy")),
    (NPY, b"\x93NUMPY\x01\x00\x10\x00{'descr': ((((((}" + b" " * 100, {}, ("body", ".npy")),
    (NPY, npy(np.array([{"a": 1}], dtype=object)), {}, ("body",)),
    (NPY, npy(np.zeros((2, 5), np.float32)), {}, ("image",)),
    (NPY, npy(np.zeros(64, np.float32)), {"colour": "red"}, ("colour",)),
    (NPY, npy(np.zeros(64, np.float32)), {"expires_in": "-1"}, ("expires_in",)),
])
async def test_malformed_binary_bodies_get_one_422_line(redis_env, headers, body, params,
                                                        words):
    async with serve(redis_env) as api:
        r = await api.post(JOBS, content=body, params=params, headers=headers)
        problem = assert_problem(r, 422, *words)
        assert "\n" not in problem["detail"]
