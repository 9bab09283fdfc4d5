"""Open Inference Protocol (KServe v2 REST) on ``inferq api``, as Triton, KServe and
MLServer serve it, so their clients (``tritonclient.http``, KServe's) talk to inferq.

An infer request becomes one inferq job, through the same admission, queue and batcher as
``POST /v1/models/{m}/jobs``, and the answer waits for it (up to ``INFERQ_API_WAIT_MAX_S``;
504 with the job's id after that). Tensors travel as JSON or with the binary-data
extension (``Inference-Header-Content-Length``: a JSON header, then raw little-endian
tensors). inferq's extension: ``"parameters": {"async": true}`` answers 202 with a job id
at once; ``GET /v2/jobs/{id}`` answers the infer response once it ended. Errors are
``{"error": "..."}`` (the protocol's shape), with inferq's status codes.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from api.bodies import validated
from api.context import Api, Who, api_of, ready_checks
from api.jobs import WaitParam, parse_wait, run, wait_final
from api.schemas import Accepted, JobRequest, JobView
from shared import tracing
from shared.errors import InputError
from shared.schemas import JobStatus, TensorSpec

router = APIRouter(prefix="/v2", tags=["open inference protocol"])

DATATYPES = {"bool": "BOOL", "int8": "INT8", "int16": "INT16", "int32": "INT32",
             "int64": "INT64", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32",
             "uint64": "UINT64", "float16": "FP16", "float32": "FP32", "float64": "FP64",
             "string": "BYTES"}
NUMPY = {v: k for k, v in DATATYPES.items() if v != "BYTES"}
HEADER = "Inference-Header-Content-Length"
PLATFORMS = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch"}


class OipError(BaseModel):
    error: str


class Tensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[Tensor]
    outputs: list[dict[str, Any]] = Field(default_factory=list)


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    outputs: list[Tensor]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class Pending(BaseModel):
    id: str
    status: str
    location: str


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": OipError} for code in (400, 401, 404, 413, 415, 422, 429, 503, *codes)}


INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": InferRequest.model_json_schema(
        ref_template="#/components/schemas/{model}")},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                 "description": "binary-data extension: the JSON header "
                                 f"({HEADER} bytes), then the tensors' raw bytes"}}}}


# -- health and metadata ------------------------------------------------------------------

@router.get("", summary="Server metadata: name, version, protocol extensions")
def server() -> dict[str, Any]:
    return {"name": "inferq", "version": "1",
            "extensions": ["binary_tensor_data", "inferq_async_jobs"]}


@router.get("/health/live", summary="The server is up (200)")
def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="Broker and result store reachable (200; else 503)",
            responses={503: {"model": OipError}})
def ready(request: Request) -> Any:
    checks = ready_checks(api_of(request))
    if all(v == "ok" for v in checks.values()):
        return {"ready": True}
    return JSONResponse({"error": f"not ready: {checks}"}, status_code=503)


@router.get("/models/{model}", response_model=ModelMetadata, responses=_errors(),
            summary="A model's metadata: versions, platform, input and output tensors")
def metadata(model: str, request: Request, who: Who) -> ModelMetadata:
    return _metadata(api_of(request), model)


@router.get("/models/{model}/versions/{version}", response_model=ModelMetadata,
            responses=_errors(), summary="One version's metadata")
def version_metadata(model: str, version: int, request: Request, who: Who) -> ModelMetadata:
    return _metadata(api_of(request), f"{model}@{version}")


@router.get("/models/{model}/ready", responses=_errors(), summary="The model resolves (200)")
def model_ready(model: str, request: Request, who: Who) -> dict[str, Any]:
    return {"name": _metadata(api_of(request), model).name, "ready": True}


def _metadata(api: Api, ref: str) -> ModelMetadata:
    version, resolved = api.model(ref)
    m = version.manifest
    return ModelMetadata(
        name=resolved.name, versions=[str(v) for v in api.client.repo.versions(resolved.name)],
        platform=PLATFORMS.get(m.runtime, m.runtime),
        inputs=[TensorMetadata(name=s.name, datatype=DATATYPES[s.dtype], shape=s.shape)
                for s in m.inputs],
        outputs=[TensorMetadata(name=s.name, datatype=DATATYPES[s.dtype], shape=s.shape)
                 for s in m.outputs])


# -- inference ----------------------------------------------------------------------------

@router.post("/models/{model}/infer", response_model=InferResponse, openapi_extra=INFER_BODY,
             responses={**_errors(504), 202: {"model": Pending}},
             summary="Infer: tensors in, tensors out (waits for the job)")
async def infer(model: str, request: Request, who: Who) -> Response:
    return await _infer(request, who, model)


@router.post("/models/{model}/versions/{version}/infer", response_model=InferResponse,
             openapi_extra=INFER_BODY, responses={**_errors(504), 202: {"model": Pending}},
             summary="Infer on one version of the model")
async def infer_version(model: str, version: int, request: Request, who: Who) -> Response:
    return await _infer(request, who, f"{model}@{version}")


@router.get("/jobs/{job_id}", response_model=InferResponse,
            responses={**_errors(410), 202: {"model": Pending}},
            summary="inferq's extension: an asynchronous infer's response once it ended")
async def job(job_id: str, request: Request, who: Who, wait: WaitParam = None) -> Response:
    api = api_of(request)
    view = await wait_final(api, job_id, who, parse_wait(wait, api.settings.api_wait_max_s))
    return _answer(api, view, None, set(), all_binary=False)


async def _infer(request: Request, who: Any, ref: str) -> Response:
    api = api_of(request)
    version, _ = api.model(ref)
    body = await request.body()
    if request.headers.get("content-encoding", "identity") != "identity":
        raise HTTPException(415, "Content-Encoding: send the request uncompressed")
    parsed, raw = _split(body, request.headers.get(HEADER))
    inputs = _inputs(version.manifest.inputs, parsed.inputs, raw)
    wanted = [str(o.get("name")) for o in parsed.outputs] or None
    known = [s.name for s in version.manifest.outputs]
    for name in wanted or ():
        if name not in known:
            raise InputError(f"outputs: the model has no output {name!r}; its outputs: "
                             f"{', '.join(known)}", field="outputs")
    binary = {str(o.get("name")) for o in parsed.outputs
              if isinstance(o.get("parameters"), dict) and o["parameters"].get("binary_data")}
    all_binary = bool(parsed.parameters.get("binary_data_output"))
    asynchronous = parsed.parameters.get("async") is True
    job = JobRequest(inputs=inputs)
    answer = await run(api, who, ref, job, 0.0 if asynchronous
                       else api.settings.api_wait_max_s, tracing.incoming(request.headers))
    if isinstance(answer, Accepted) and not asynchronous:
        location = f"/v2/jobs/{answer.id}"
        return JSONResponse({"error": f"job {answer.id} did not end within "
                             f"{api.settings.api_wait_max_s:g} s (INFERQ_API_WAIT_MAX_S); "
                             f"poll {location}"}, 504, {"Location": location})
    return _answer(api, answer, parsed.id, binary, all_binary, wanted)


def _split(body: bytes, header: str | None) -> tuple[InferRequest, bytes]:
    """The JSON part (all of it, or ``header`` bytes) and the binary rest."""
    size = len(body)
    if header is not None:
        if not header.strip().isdigit() or int(header) > len(body):
            raise InputError(f"{HEADER}: {header!r} is not a length within the body's "
                             f"{len(body)} bytes", field=HEADER)
        size = int(header)
    try:
        document = json.loads(body[:size])
    except (ValueError, RecursionError) as exc:
        raise InputError(f"body: not a JSON infer request ({type(exc).__name__})",
                         field="body") from None
    return validated(InferRequest, document), body[size:]


def _inputs(specs: list[TensorSpec], tensors: list[Tensor], raw: bytes) -> dict[str, Any]:
    """Request tensors -> {input name: rows}, each checked against its declared shape."""
    known = {s.name: s for s in specs}
    values: dict[str, Any] = {}
    offset = 0
    for tensor in tensors:
        spec = known.get(tensor.name)
        field = f"inputs.{tensor.name}"
        if spec is None:
            raise InputError(f"{field}: the model has no input {tensor.name!r}; its inputs: "
                             f"{', '.join(known)}", field=field)
        if tensor.datatype != DATATYPES[spec.dtype]:
            raise InputError(f"{field}: datatype {tensor.datatype!r}; the model takes "
                             f"{DATATYPES[spec.dtype]}", field=field)
        count = int(np.prod(tensor.shape)) if tensor.shape else 1
        if any(d < 0 for d in tensor.shape) or not tensor.shape:
            raise InputError(f"{field}: shape {tensor.shape} must list the rows first and "
                             "no negative dimension", field=field)
        size = tensor.parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(raw):
                raise InputError(f"{field}: binary_data_size {size!r} runs past the "
                                 f"{len(raw)} bytes after the JSON header", field=field)
            flat = _from_bytes(raw[offset:offset + size], tensor.datatype, count, field)
            offset += size
        elif tensor.data is None:
            raise InputError(f"{field}: no data and no binary_data_size", field=field)
        else:
            flat = _from_json(tensor.data, tensor.datatype, count, field)
        values[tensor.name] = flat.reshape(tensor.shape[0], -1) if spec.dtype == "string" \
            else flat.reshape(tensor.shape)
    missing = [name for name in known if name not in values]
    if missing:
        raise InputError(f"inputs: no tensor for the model's input {missing[0]!r}",
                         field="inputs")
    if offset != len(raw):
        raise InputError(f"body: {len(raw) - offset} bytes after the last tensor",
                         field="body")
    return {name: (arr[:, 0].tolist() if known[name].dtype == "string" else arr)
            for name, arr in values.items()}


def _from_json(data: list[Any], datatype: str, count: int, field: str) -> np.ndarray:
    try:
        arr = np.asarray(data, dtype=object if datatype == "BYTES" else NUMPY[datatype])
    except (ValueError, TypeError, OverflowError):
        raise InputError(f"{field}: data is not a list of {datatype} values", field=field
                         ) from None
    if arr.size != count or (datatype == "BYTES"
                             and not all(isinstance(v, str) for v in arr.flat)):
        raise InputError(f"{field}: {arr.size} values for a shape of {count}"
                         if arr.size != count else f"{field}: BYTES data must be strings",
                         field=field)
    return arr.reshape(-1)


def _from_bytes(data: bytes, datatype: str, count: int, field: str) -> np.ndarray:
    if datatype != "BYTES":
        dtype = np.dtype(NUMPY[datatype]).newbyteorder("<")
        if len(data) != count * dtype.itemsize:
            raise InputError(f"{field}: {len(data)} bytes for {count} {datatype} values",
                             field=field)
        return np.frombuffer(data, dtype=dtype)
    items, pos = [], 0
    while pos < len(data):  # each element: a 4-byte little-endian length, then its bytes
        if pos + 4 > len(data):
            raise InputError(f"{field}: a truncated BYTES element", field=field)
        (n,) = struct.unpack_from("<I", data, pos)
        chunk = data[pos + 4:pos + 4 + n]
        if len(chunk) != n:
            raise InputError(f"{field}: a truncated BYTES element", field=field)
        try:
            items.append(chunk.decode())
        except UnicodeDecodeError:
            raise InputError(f"{field}: BYTES element {len(items)} is not UTF-8 text",
                             field=field) from None
        pos += 4 + n
    if len(items) != count:
        raise InputError(f"{field}: {len(items)} values for a shape of {count}", field=field)
    return np.asarray(items, dtype=object)


# -- answers ------------------------------------------------------------------------------

def _answer(api: Api, view: JobView | Accepted, request_id: str | None, binary: set[str],
            all_binary: bool, wanted: list[str] | None = None) -> Response:
    if isinstance(view, Accepted) or view.status in (JobStatus.queued, JobStatus.running):
        location = f"/v2/jobs/{view.id}"
        return JSONResponse(Pending(id=view.id, status=view.status, location=location
                                    ).model_dump(), 202, {"Location": location})
    if view.status in (JobStatus.cancelled, JobStatus.expired):
        return JSONResponse({"error": f"job {view.id}: {view.error}"}, 410)
    if view.status is JobStatus.failed or view.errors or view.outputs is None:
        why = "; ".join(f"row {e.row}" + (f", {e.field}" if e.field else "") + f": {e.message}"
                        for e in view.errors) or view.error or "no outputs"
        return JSONResponse({"error": f"job {view.id} failed: {why}"}, 422)
    version, _ = api.model(f"{view.model}@{view.version}" if view.version else view.model)
    specs = {s.name: s for s in version.manifest.outputs}
    names = [n for n in wanted or list(view.outputs) if n in view.outputs]
    tensors, blobs = [], []
    for name in names:
        spec = specs.get(name)
        dtype = spec.dtype if spec is not None else "float32"
        arr = np.asarray(view.outputs[name], dtype=object if dtype == "string" else dtype)
        tensor = Tensor(name=name, datatype=DATATYPES[dtype], shape=list(arr.shape))
        if (all_binary or name in binary) and dtype != "string":
            blob = arr.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tobytes()
            tensor.parameters = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor.data = arr.reshape(-1).tolist()
        tensors.append(tensor)
    document = InferResponse(model_name=view.model, model_version=str(view.version or ""),
                             id=request_id, outputs=tensors
                             ).model_dump_json(exclude_none=True).encode()
    if not blobs:
        return Response(document, media_type="application/json")
    return Response(b"".join([document, *blobs]), media_type="application/octet-stream",
                    headers={HEADER: str(len(document))})
