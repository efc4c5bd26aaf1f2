"""gzip and zstd: each batch's CSV rows are one gzip member or one zstd frame appended to the file.

Both carry a checksum of their rows that the reader verifies before a row of the batch is handed
on: gzip's CRC32 and length in every member's trailer (zlib checks both), zstd's content checksum
(XXH64), written with every frame since issue 21. A zstd frame without one is refused when the
file's first frame has one (files written before carry none, and are read as they are).
"""

from __future__ import annotations

import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from engine.archive_formats.base import Damaged, missing_package
from engine.errors import MsggcError

COMPRESS_LEVEL = 1
"""zlib's fastest level: the file is written inside the batch, so speed matters more than size."""
ZSTD_LEVEL = 1
ZSTD_THREADS = -1
"""libzstd's own worker threads, as many as the machine has cores."""
READ_CHUNK = 1 << 20
HAND_OVER = 1 << 20
"""The COPY stream arrives a row at a time; the compressor takes it a MiB at a time."""
ZSTD_FRAME_HEADER_MAX = 18


def zstd() -> Any:
    try:
        import zstandard
    except ImportError:
        raise missing_package("zstandard") from None
    return zstandard


class Compressor(Protocol):
    def compress(self, data: bytes, /) -> bytes: ...

    def flush(self) -> bytes: ...


def _compressor(fmt: str) -> Compressor:
    if fmt == "zstd":
        return zstd().ZstdCompressor(  # type: ignore[no-any-return]
            level=ZSTD_LEVEL, threads=ZSTD_THREADS, write_checksum=True).compressobj()
    return zlib.compressobj(COMPRESS_LEVEL, zlib.DEFLATED, 31)  # 31: a gzip member, mtime 0


def compressed(fmt: str, data: bytes) -> bytes:
    """``data`` as one member (frame) of its own: the file's header line."""
    compressor = _compressor(fmt)
    return compressor.compress(data) + compressor.flush()


class Compressing:
    """A batch's CSV rows compressed into one gzip member or zstd frame on a thread of its own,
    while the COPY stream is still arriving (zlib and libzstd release the GIL)."""

    def __init__(self, fmt: str) -> None:
        self._compressor = _compressor(fmt)
        self._pending = bytearray()
        self._chunks: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._out = bytearray()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def write(self, block: bytes | bytearray | memoryview) -> None:
        self._pending += block
        if len(self._pending) >= HAND_OVER:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="msggc-archive-compress", daemon=True)
            self._thread.start()
        self._chunks.put(bytes(self._pending))
        self._pending.clear()

    def _run(self) -> None:
        try:
            while (chunk := self._chunks.get()) is not None:
                self._out += self._compressor.compress(chunk)
        except BaseException as exc:  # handed to finish(), in the batch's thread
            self._error = exc

    def finish(self) -> bytes:
        if self._thread is None:  # a small batch: compressed here
            if not self._pending:
                return b""
            return self._compressor.compress(bytes(self._pending)) + self._compressor.flush()
        if self._pending:
            self._hand_over()
        self._chunks.put(None)
        self._thread.join()
        if self._error is not None:
            raise MsggcError(f"cannot compress the archive: {self._error}")
        return bytes(self._out + self._compressor.flush())

    def abort(self) -> None:
        if self._thread is not None:
            self._chunks.put(None)


def gzip_members(path: Path) -> Iterator[bytes]:
    """Each member's rows, once zlib has checked its CRC32 and length."""
    return _frames(path, lambda: zlib.decompressobj(wbits=31), None)


def zstd_frames(path: Path) -> Iterator[bytes]:
    """Each frame's rows, once libzstd has checked its content checksum."""
    module = zstd()
    return _frames(path, lambda: module.ZstdDecompressor().decompressobj(),
                   lambda start: bool(module.get_frame_parameters(start).has_checksum))


def _frames(path: Path, decompressor: Callable[[], Any],
            checksummed: Callable[[bytes], bool] | None) -> Iterator[bytes]:
    """The members one by one; a member is handed on only whole, so a damaged one (a checksum
    that does not match, or a cut) yields none of its rows."""
    first: bool | None = None
    with path.open("rb") as handle:
        data = handle.read(READ_CHUNK)
        while data:
            if checksummed is not None:
                while len(data) < ZSTD_FRAME_HEADER_MAX and (more := handle.read(READ_CHUNK)):
                    data += more
                has = checksummed(data)
                first = has if first is None else first
                if first and not has:
                    raise Damaged("it carries no checksum, unlike the file's first frame:"
                                  " the file is damaged")
            reader = decompressor()
            rows = bytearray()
            while True:
                rows += reader.decompress(data)
                if reader.eof:
                    data = reader.unused_data or handle.read(READ_CHUNK)
                    break
                data = handle.read(READ_CHUNK)
                if not data:
                    raise EOFError("it is cut short (the file ends inside it)")
            yield bytes(rows)
