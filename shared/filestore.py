"""The embedded result store: Celery's file-system backend with atomic writes.

Celery's ``FilesystemBackend.set`` writes in place, so a reader polling the file can
see half a result. Writing to a temporary file and renaming it over the key makes
every read see a whole result or none.
"""

from __future__ import annotations

import os
import tempfile

from celery.backends.filesystem import FilesystemBackend
from kombu.utils.encoding import ensure_bytes

URL_PREFIX = "shared.filestore:AtomicFilesystemBackend+"


class AtomicFilesystemBackend(FilesystemBackend):
    def set(self, key: bytes, value: bytes | str) -> None:
        target = self._filename(key)
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=b".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(ensure_bytes(value))
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
