"""Pydantic schemas at the edges: model manifests and job results."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


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


class Manifest(BaseModel):
    """``models/<name>/<version>/manifest.json``: what a model takes, returns and is worth."""

    name: str
    version: int = Field(ge=1)
    task: str = "classification"
    runtime: Literal["onnx", "torchscript"] = "onnx"
    artifact: str = "model.onnx"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    preprocessing: str = ""
    compression: str = "none"
    quality: dict[str, float] = Field(default_factory=dict)
    size_bytes: int = 0
    created_at: str = ""
    notes: str = ""

    _check_name = field_validator("name")(classmethod(lambda cls, v: check_model_name(v)))

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
    submitted_at: float | None = None
    finished_at: float | None = None

    @property
    def done(self) -> bool:
        return self.status in (JobStatus.succeeded, JobStatus.failed)
