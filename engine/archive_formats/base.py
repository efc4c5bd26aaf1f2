"""What every archive format shares: the encoder a batch writes through, the error a damaged batch
raises, and the durability of a directory entry."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from engine.errors import MsggcError, UsageError


class Encoder(Protocol):
    """One batch's rows on their way into the file: the CSV of its ``COPY`` stream in, the bytes
    the batch appends out."""

    def write(self, block: bytes | bytearray | memoryview) -> None: ...

    def finish(self) -> bytes:
        """What the batch appends: b"" when it moved no row."""
        ...

    def abort(self) -> None: ...


class Damaged(ValueError):
    """A batch whose bytes are not the ones written: its checksum does not match, or it lacks one
    where the file's first batch has one. Nothing of it may be restored."""


def missing_package(package: str) -> MsggcError:
    return UsageError(f"this archive format needs the {package} package: pip install 'msggc[archive]'")


def fsync_directory(directory: Path) -> None:
    """A new or renamed entry survives a crash only once its directory is fsynced."""
    handle = os.open(directory.resolve(), os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
