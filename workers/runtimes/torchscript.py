"""TorchScript models, run with torch."""

from __future__ import annotations

import logging

import numpy as np

from shared.repository import ModelVersion
from workers.runtimes.base import example_inputs

logger = logging.getLogger(__name__)


class TorchScriptRuntime:
    """A TorchScript module run with torch; outputs in the manifest's order."""

    def __init__(self, version: ModelVersion, *, threads: int, device: str = "cpu"):
        import torch

        self.version = version
        self.torch = torch
        self.device = torch.device(device if device.startswith("cuda")
                                   and torch.cuda.is_available() else "cpu")
        torch.set_num_threads(threads)
        self.module = torch.jit.load(str(version.artifact), map_location=self.device).eval()
        self.input_names = [s.name for s in version.manifest.inputs]
        self.output_names = [s.name for s in version.manifest.outputs]
        logger.info("loaded %s (%s) TorchScript on %s, %d threads", version.key,
                    version.manifest.variant, self.device, threads)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(inputs[n])).to(self.device)
                    for n in self.input_names]
            out = self.module(*args)
        values = out if isinstance(out, (tuple, list)) else (out,)
        return {n: v.cpu().numpy() for n, v in zip(self.output_names, values, strict=True)}

    def warm_up(self, rows: int) -> None:
        for n in (1, rows):
            self.run(example_inputs(self.version, n))
