"""Streaming firmware uploads: every chunk goes to a temporary file on disk and through the hashes.

The file is never held whole in memory, the server computes sha256 (and sha1 and md5 for hawkBit
clients) while it arrives, and an upload past FIRMWARE_MAX_UPLOAD_SIZE stops at the limit.
"""

from __future__ import annotations

import hashlib
from typing import Any

from django.conf import settings
from django.core.files.uploadedfile import TemporaryUploadedFile
from django.core.files.uploadhandler import StopUpload, TemporaryFileUploadHandler


class HashingUploadHandler(TemporaryFileUploadHandler):
    too_large = False

    def new_file(self, *args: Any, **kwargs: Any) -> None:
        super().new_file(*args, **kwargs)
        self.size = 0
        self.sha256 = hashlib.sha256()
        self.sha1 = hashlib.sha1(usedforsecurity=False)
        self.md5 = hashlib.md5(usedforsecurity=False)

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes | None:
        self.size += len(raw_data)
        if self.size > settings.FIRMWARE_MAX_UPLOAD_SIZE:
            self.too_large = True
            self.file.close()  # deletes the temporary file
            raise StopUpload(connection_reset=True)
        self.sha256.update(raw_data)
        self.sha1.update(raw_data)
        self.md5.update(raw_data)
        self.file.write(raw_data)
        return None

    def file_complete(self, file_size: int) -> TemporaryUploadedFile:
        uploaded = super().file_complete(file_size)
        assert isinstance(uploaded, TemporaryUploadedFile)
        uploaded.hashes = {  # type: ignore[attr-defined]
            "sha256": self.sha256.hexdigest(),
            "sha1": self.sha1.hexdigest(),
            "md5": self.md5.hexdigest(),
        }
        return uploaded
