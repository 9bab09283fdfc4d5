"""What a model call's exception means for the worker: worth running again as it is
(out of memory, a device hiccup), or a lost GPU the process cannot recover from."""

from __future__ import annotations

import re

from shared.errors import TransientError

_TRANSIENT = re.compile(r"out of memory|failed to allocate|resource exhausted|"
                        r"CUDA error|CUDA_ERROR|CUBLAS_STATUS|CUDNN_STATUS|device busy",
                        re.IGNORECASE)


EXIT_DEVICE_LOST = 75  # the worker's exit status when its device failed
_DEVICE_LOST = re.compile(r"illegal memory access|device-side assert|unspecified launch "
                          r"failure|no CUDA-capable device|CUDA driver version|"
                          r"device(?: has been)? (?:lost|removed)|ECC error|"
                          r"cudaErrorDevicesUnavailable|CUDA_ERROR_(?:LAUNCH_FAILED|"
                          r"ILLEGAL_ADDRESS|NO_DEVICE|ECC_UNCORRECTABLE)", re.IGNORECASE)


def is_device_lost(exc: BaseException) -> bool:
    """An error that leaves a GPU unusable for this process (unlike out of memory)."""
    return bool(_DEVICE_LOST.search(str(exc)))


def is_transient(exc: BaseException) -> bool:
    """Worth running again as it is: the device ran out of memory or hiccuped. Anything
    else (bad input, a model bug) would fail the same way again."""
    return isinstance(exc, MemoryError | TransientError) or bool(_TRANSIENT.search(str(exc)))
