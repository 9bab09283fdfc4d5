"""Commands that need an optional extra import its modules here, so a missing extra is
one line naming what to install, not a traceback."""

from __future__ import annotations

import importlib
from types import ModuleType

from shared.errors import InferqError


def worker_module(name: str) -> ModuleType:
    """``workers.<name>``, or InferqError naming the ``worker`` extra."""
    try:
        return importlib.import_module(f"workers.{name}")
    except ImportError as exc:
        raise InferqError(f"this command needs the worker extra ({exc}); "
                          "install it with: pip install 'inferq[worker]'") from None
