"""Request and response bodies of the HTTP API (these make ``/openapi.json``)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field

from shared.schemas import JobStatus, RowError


class Problem(BaseModel):
    """Every error answer: what was wrong, and for input, which row and field."""

    detail: str
    row: int | None = None
    field: str | None = None


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: Any = Field(description="one row, a few rows (a list of rows), text, or "
                        "{input name: value} for models with several inputs",
                        examples=[[0.0] * 64])
    callback_url: AnyHttpUrl | None = Field(None, description="POSTed the result, signed, "
                                            "when the job ends")
    priority: Literal["normal", "high"] = Field("normal", description="high: taken before "
                                                "the model's normal backlog")
    expires_in: float | None = Field(None, gt=0, le=7 * 86400, description="seconds; a job "
                                     "no worker has started by then is not run and ends "
                                     "`expired`")


class Timings(BaseModel):
    submitted_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    queue_wait_s: float | None = Field(None, description="submitted until a worker took it")
    run_s: float | None = Field(None, description="taken until its result was ready")
    batch_rows: list[int] = Field(default_factory=list,
                                  description="rows of each model call the job ran in")


class Delivery(BaseModel):
    at: float
    attempt: int
    status_code: int | None = None
    error: str | None = None


class CallbackInfo(BaseModel):
    url: str
    state: Literal["pending", "delivered", "failed"]
    deliveries: list[Delivery] = Field(default_factory=list)

    @classmethod
    def from_record(cls, record: dict[str, str]) -> CallbackInfo | None:
        """From a job or batch record in the API store; None without a callback."""
        url = record.get("callback_url")
        if url is None:
            return None
        return cls(url=url, state=record.get("callback_state", "pending"),  # type: ignore[arg-type]
                   deliveries=[Delivery(**d) for d in json.loads(record.get("deliveries",
                                                                            "[]"))])


class JobView(BaseModel):
    id: str
    status: JobStatus
    model: str
    version: int | None = None
    variant: str | None = None
    outputs: dict[str, list[Any]] | None = Field(None, description="output name -> one "
                                                 "value per input row")
    errors: list[RowError] = Field(default_factory=list, description="rows that failed")
    error: str | None = Field(None, description="why the whole job failed")
    truncated: list[int] = Field(default_factory=list, description="text rows cut to the "
                                 "model's max length")
    timings: Timings = Field(default_factory=Timings)
    worker: str | None = None
    callback: CallbackInfo | None = None


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="name[:variant][@version]", examples=["digits"])
    rows: list[Any] = Field(description="one entry per row", min_length=1)
    callback_url: AnyHttpUrl | None = None


class BatchView(BaseModel):
    id: str
    model: str
    status: Literal["queued", "running", "completed", "cancelled"]
    total: int
    done: int = Field(description="rows with a result or an error")
    failed: int = Field(description="rows that ended in an error")
    cancelled: int = 0
    rows_per_s: float | None = None
    eta_s: float | None = None
    created_at: float
    results: str = Field(description="where the NDJSON results stream is")
    callback: CallbackInfo | None = None


class Accepted(BaseModel):
    id: str
    status: JobStatus | str
    location: str


class ModelView(BaseModel):
    name: str
    version: int
    variant: str
    task: str
    runtime: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    quality: dict[str, float] = Field(default_factory=dict)
    variants: list[str] = Field(default_factory=list)
