"""Pydantic schemas at the edges: model manifests and job results."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.errors import JobCancelled, JobExpired, JobFailed

MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


VARIANT = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


def check_variant(variant: str) -> str:
    if not isinstance(variant, str) or not VARIANT.fullmatch(variant):
        raise ValueError(f"variant {variant!r} is invalid: use 1-32 lowercase letters, "
                         "digits, '_' or '-'")
    return variant


def check_model_name(name: str) -> str:
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise ValueError(
            f"model name {name!r} is invalid: use 1-64 lowercase letters, digits, '_' or '-'"
        )
    return name


class TensorSpec(BaseModel):
    """One named input or output: dtype and shape, -1 for a dynamic axis (axis 0 = rows)."""

    model_config = ConfigDict(frozen=True)

    name: str
    dtype: Literal["bool", "int8", "int16", "int32", "int64", "uint8", "float16", "float32",
                   "float64", "string"]
    shape: list[int]
    description: str = ""

    @field_validator("shape")
    @classmethod
    def _rows_first(cls, shape: list[int]) -> list[int]:
        if not shape or shape[0] != -1:
            raise ValueError("shape must start with -1, the row axis")
        if any(d < -1 or d == 0 for d in shape):
            raise ValueError("dimensions are positive, or -1 for dynamic")
        return shape

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[1:])

    @property
    def np_dtype(self) -> np.dtype[Any]:
        return np.dtype(self.dtype)


class Preprocessing(BaseModel):
    """What the worker does to inputs before the graph (text: tokenize, pad per batch)."""

    kind: Literal["none", "text"] = "none"
    tokenizer: str | None = None  # a file in the version folder, e.g. tokenizer.json
    max_length: int | None = Field(None, ge=1)  # longer inputs are truncated, and say so
    pooling: Literal["none", "mean", "cls"] = "none"  # done inside the graph
    normalize: bool = False  # L2, inside the graph
    description: str = ""


class Compression(BaseModel):
    """How this version was derived from its fp32 parent."""

    method: str = "none"  # none | int8-static | int8-dynamic | fp16 | prune:0.5 | distill | ...
    parent_version: int | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class Manifest(BaseModel):
    """``models/<name>/<version>/manifest.json``: what a model takes, returns and is worth."""

    schema_version: Literal[2] = 2
    name: str
    version: int = Field(ge=1)
    variant: str = "fp32"  # fp32 | int8 | fp16 | pruned | distilled | torchscript | ...
    task: str = "classification"
    runtime: Literal["onnx", "torchscript"] = "onnx"
    artifact: str = "model.onnx"
    artifact_sha256: str = ""  # checked on load: a corrupted artifact is refused
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    compression: Compression = Field(default_factory=Compression)
    # ONNX Runtime session options this artifact is measured with, e.g.
    # {"disabled_optimizers": [...], "allow_spinning": false}; workers load it with them.
    runtime_options: dict[str, Any] = Field(default_factory=dict)
    # Measured on the build machine: quality (accuracy, or cosine/nn agreement vs the fp32
    # parent), speed (rows_per_s with threads and batch), size.
    quality: dict[str, float] = Field(default_factory=dict)
    speed: dict[str, float] = Field(default_factory=dict)
    size_bytes: int = 0
    # Reference input statistics for drift monitoring: per-feature mean/std, or a token
    # length histogram for text.
    reference_stats: dict[str, Any] = Field(default_factory=dict)
    created_at: str = ""
    notes: str = ""

    _check_name = field_validator("name")(classmethod(lambda cls, v: check_model_name(v)))
    _check_variant = field_validator("variant")(classmethod(lambda cls, v: check_variant(v)))

    def input(self, name: str | None = None) -> TensorSpec:
        if name is None:
            return self.inputs[0]
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    retrying = "retrying"
    cancelled = "cancelled"
    expired = "expired"  # its deadline passed before a worker started it: not run


FINAL_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled,
                            JobStatus.expired})


class RowError(BaseModel):
    row: int
    field: str | None = None
    message: str


class JobResult(BaseModel):
    """What a client reads back for one job id."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    job_id: str
    status: JobStatus
    model: str | None = None
    version: int | None = None
    outputs: dict[str, Any] | None = None  # name -> numpy array, one entry per row
    errors: list[RowError] = Field(default_factory=list)
    error: str | None = None  # the whole job failed
    batch_rows: list[int] = Field(default_factory=list)  # size of each model call it ran in
    truncated: list[int] = Field(default_factory=list)  # rows cut to the model's max length
    submitted_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    variant: str | None = None
    worker: str | None = None

    @property
    def done(self) -> bool:
        return self.status in FINAL_STATUSES

    def checked_outputs(self) -> dict[str, Any]:
        """The outputs; JobCancelled, JobExpired, or JobFailed if the job or a row failed."""
        if self.status is JobStatus.cancelled:
            raise JobCancelled(self.error or "cancelled before it ran")
        if self.status is JobStatus.expired:
            raise JobExpired(self.error or "its deadline passed before it ran")
        if self.status is not JobStatus.succeeded:
            raise JobFailed(self.error or "job failed")
        if self.errors:
            raise JobFailed("; ".join(e.message for e in self.errors))
        assert self.outputs is not None
        return self.outputs
