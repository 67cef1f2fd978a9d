"""Numpy `.npz` files without loading them whole: an uncompressed member's array mapped from the
file, any member read in chunks of rows, arrays written in chunks with their data aligned.

An `.npz` is a ZIP of `.npy` files. A member stored without compression (ZIP_STORED, what
np.savez writes) lies in the file as-is: its data starts after the member's *local* ZIP header
(30 bytes, its name, its extra field, which may differ from the central directory's) and the
`.npy` header. There np.frombuffer over an mmap of the file gives the array without reading it.
"""
from __future__ import annotations

import io
import mmap
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from numpy.lib import format as npy

from traces.errors import UserError

LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")   # the ZIP local file header (zipfile.structFileHeader)
LOCAL_SIGNATURE = b"PK\003\004"
ZIP64_LOCAL_EXTRA = 20     # the zip64 sizes record zipfile adds to a local header (force_zip64)
ALIGN = 64                 # routing data starts on a 64-byte boundary in the file (cache lines, SIMD loads)
PAD_EXTRA_ID = 0xD935      # the extra-field id zipalign uses for padding; readers skip unknown ids
CHUNK_BYTES = 16 << 20     # chunked reads and writes hold about this much at a time
FIXED_DATE = (1980, 1, 1, 0, 0, 0)   # the same arrays write the same bytes
# Pages are dropped a block at a time: a page fault maps the whole page-cache folio around it
# (up to 2 MiB, naturally aligned in the file, on Linux 6.x filesystems with large folios), so
# dropping only a request's own pages leaves the folio's others to be mapped again by a neighbour.
RELEASE_BLOCK = max(mmap.PAGESIZE, 2 << 20)


class NpzError(UserError):
    """A damaged or unsupported .npz; the caller adds the file's name."""


class NpzReader:
    """An open .npz: each member's .npy header, its small arrays read, its stored arrays mapped."""

    def __init__(self, path):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        try:
            self.zip = zipfile.ZipFile(self._file)
        except (zipfile.BadZipFile, EOFError, ValueError) as e:
            self._file.close()
            raise NpzError(f"not a readable .npz ({e})") from None
        self.infos = {i.filename.removesuffix(".npy"): i for i in self.zip.infolist()}
        self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.zip.close()
        self._file.close()   # a map made from it stays valid while arrays use it

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    def stored(self, name: str) -> bool:
        return self.infos[name].compress_type == zipfile.ZIP_STORED

    def read(self, name: str) -> np.ndarray:
        """A member read whole into memory (per-request arrays, compressed members)."""
        try:
            with self.zip.open(self.infos[name]) as f:
                return npy.read_array(f, allow_pickle=False)
        except (zipfile.BadZipFile, EOFError, zlib.error, ValueError) as e:
            raise NpzError(f"member '{name}' is damaged ({e})") from None

    def header(self, name: str) -> tuple[tuple, np.dtype]:
        """A member's shape and dtype, from its .npy header alone."""
        with self._open(name) as f:
            shape, dtype, _ = _npy_header(f, name)
        return shape, dtype

    def _open(self, name: str):
        try:
            return self.zip.open(self.infos[name])
        except (zipfile.BadZipFile, EOFError) as e:
            raise NpzError(f"member '{name}' is damaged ({e})") from None

    def data_offset(self, name: str) -> tuple[int, tuple, np.dtype]:
        """Where a stored member's array data starts in the file, and its shape and dtype."""
        info = self.infos[name]
        self._file.seek(info.header_offset)
        local = self._file.read(LOCAL_HEADER.size)
        if len(local) < LOCAL_HEADER.size or local[:4] != LOCAL_SIGNATURE:
            raise NpzError(f"member '{name}': no ZIP local header at offset {info.header_offset} (truncated?)")
        fields = LOCAL_HEADER.unpack(local)
        start = info.header_offset + LOCAL_HEADER.size + fields[10] + fields[11]   # + name + extra lengths
        self._file.seek(start)
        shape, dtype, fortran = _npy_header(self._file, name)
        if fortran and len(shape) > 1:
            raise NpzError(f"member '{name}' is stored in Fortran order; rewrite it with `emoe trace convert`")
        offset = self._file.tell()
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset - start + nbytes > info.file_size or offset + nbytes > self.file_size:
            raise NpzError(f"member '{name}' is shorter than its header says (truncated file?)")
        return offset, shape, dtype

    @property
    def file_size(self) -> int:
        return self.path.stat().st_size

    def map(self, name: str) -> tuple[np.ndarray, int]:
        """A stored member as a read-only array over a map of the file, and its data's file offset."""
        offset, shape, dtype = self.data_offset(name)
        count = int(np.prod(shape, dtype=np.int64))
        if count == 0:
            a = np.empty(shape, dtype)
            a.flags.writeable = False
            return a, offset
        if self._mm is None:
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        return np.frombuffer(self._mm, dtype, count, offset).reshape(shape), offset

    @property
    def mapping(self):
        return self._mm

    def chunks(self, name: str, rows: int):
        """A member's array, `rows` first-axis rows at a time, read from its (possibly deflated)
        stream: memory stays bounded whatever the member's size."""
        with self._open(name) as f:
            shape, dtype, fortran = _npy_header(f, name)
            if fortran and len(shape) > 1:
                raise NpzError(f"member '{name}' is stored in Fortran order; it cannot be streamed")
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            for lo in range(0, shape[0], rows):
                n = min(rows, shape[0] - lo)
                try:
                    data = f.read(n * row_bytes)
                except (zipfile.BadZipFile, EOFError, zlib.error) as e:
                    raise NpzError(f"member '{name}' is damaged ({e})") from None
                if len(data) != n * row_bytes:
                    raise NpzError(f"member '{name}' ends early (truncated file?)")
                yield np.frombuffer(data, dtype).reshape((n,) + tuple(shape[1:]))


def _npy_header(f, name: str):
    """A .npy header: shape, dtype, Fortran order."""
    try:
        version = npy.read_magic(f)
        read = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
        if read is not None:
            shape, fortran, dtype = read(f)
    except (ValueError, EOFError) as e:
        raise NpzError(f"member '{name}' has no readable .npy header ({e})") from None
    if read is None:
        raise NpzError(f"member '{name}' is .npy version {version}; only 1.0 and 2.0 are read")
    if dtype.hasobject:
        raise NpzError(f"member '{name}' holds Python objects; a trace holds plain arrays only")
    return shape, dtype, fortran


class MappedRows:
    """The release hook of arrays mapped from one file (Trace.source): rows that will not be read
    again leave the process's memory (madvise DONTNEED; read again, they come back from the file).
    arrays: (data offset, bytes per row, rows) of each mapped array; row0: where this trace's
    row 0 lies in them (a subset's view); views of one file share one ledger of released bytes."""

    def __init__(self, mm, arrays: list[tuple[int, int, int]], row0: int = 0, ledger=None):
        self.mm, self.arrays, self.row0 = mm, arrays, row0
        self.ledger = ledger or _Ledger(len(mm), [(off, off + rb * n) for off, rb, n in arrays])

    @classmethod
    def sharing(cls, mm, *groups: list[tuple[int, int, int]]) -> list[MappedRows]:
        """One MappedRows per group of arrays, each group its own row space (token rows, request
        rows), all on one ledger: a block holding bytes of two groups is dropped once both are done."""
        ledger = _Ledger(len(mm), [(off, off + rb * n) for g in groups for off, rb, n in g])
        return [cls(mm, g, ledger=ledger) for g in groups]

    def shifted(self, rows: int) -> MappedRows:
        return MappedRows(self.mm, self.arrays, self.row0 + rows, self.ledger)

    def _ranges(self, lo: int, hi: int):
        for offset, row_bytes, _ in self.arrays:
            yield offset + (self.row0 + lo) * row_bytes, offset + (self.row0 + hi) * row_bytes

    def release_rows(self, lo: int, hi: int) -> None:
        """Rows lo:hi are done (each row is released once): a block all of whose routing bytes are
        done is dropped. Not the rows' own pages at once: the folio a neighbour in flight reads
        would map them back; nor their whole blocks: that would drop the neighbours' pages too."""
        if hi <= lo:
            return
        for start, end in self._ranges(lo, hi):
            for b in self.ledger.add(start, end):
                self._drop(b * RELEASE_BLOCK, (b + 1) * RELEASE_BLOCK)

    def drop_rows(self, lo: int, hi: int) -> None:
        """Drop rows lo:hi now, with the blocks they touch (for a pass in file order: validation, a copy)."""
        for start, end in self._ranges(lo, hi):
            self._drop(start // RELEASE_BLOCK * RELEASE_BLOCK, -(-end // RELEASE_BLOCK) * RELEASE_BLOCK)

    def _drop(self, start: int, end: int) -> None:
        end = min(end, len(self.mm))
        if end > start and hasattr(mmap, "MADV_DONTNEED"):   # elsewhere (Windows) pages stay until unmapped
            self.mm.madvise(mmap.MADV_DONTNEED, start, end - start)


class _Ledger:
    """Per RELEASE_BLOCK of a file: the bytes of mapped routing data in it, and how many are released.
    Plain lists: a release touches a block or two, where numpy's per-call cost would dominate."""

    def __init__(self, size: int, spans):
        n = -(-size // RELEASE_BLOCK)
        self.data, self.released = [0] * n, [0] * n
        for start, end in spans:
            _spread(self.data, start, end)

    def add(self, start: int, end: int) -> list[int]:
        """Count bytes start:end released; returns the blocks among them now wholly released."""
        if end <= start:
            return []
        blocks = _spread(self.released, start, end)
        return [b for b in blocks if self.released[b] >= self.data[b]]


def _spread(counts: list[int], start: int, end: int) -> range:
    """Add bytes start:end to the counts of the blocks they fall in; returns those blocks."""
    B = RELEASE_BLOCK
    blocks = range(start // B, (end - 1) // B + 1)
    for b in blocks:
        counts[b] += min(end, (b + 1) * B) - max(start, b * B)
    return blocks


class NpzWriter:
    """Writes an .npz member by member into an open file: whole small arrays, or a large one from
    chunks of rows (never more in memory than a chunk), its data aligned to ALIGN bytes in the file."""

    def __init__(self, f, compress: bool = False):
        self.f = f
        self.compress = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        self.zip = zipfile.ZipFile(f, "w", self.compress, allowZip64=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.zip.close()   # also after an error: the half-written file is the caller's to delete

    def add(self, name: str, a: np.ndarray) -> None:
        a = np.asanyarray(a)
        self.add_chunks(name, a.shape, a.dtype, [a] if a.ndim else [a.reshape(1)], align=False)

    def add_chunks(self, name: str, shape, dtype, chunks, align: bool = True) -> None:
        """`chunks`: arrays whose rows, concatenated, are the member's (shape, dtype) array."""
        dtype = np.dtype(dtype)
        header = io.BytesIO()
        npy.write_array_header_2_0(header, {"descr": npy.dtype_to_descr(dtype), "fortran_order": False,
                                            "shape": tuple(int(s) for s in shape)})
        info = zipfile.ZipInfo(name + ".npy", date_time=FIXED_DATE)
        info.compress_type = self.compress
        info.external_attr = 0o644 << 16
        align = align and self.compress == zipfile.ZIP_STORED
        if align:
            local = LOCAL_HEADER.size + len(info.filename.encode()) + ZIP64_LOCAL_EXTRA
            info.extra = _padding(self.f.tell() + local + header.tell())
        want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        written = 0
        with self.zip.open(info, "w", force_zip64=True) as w:
            if align and (self.f.tell() + header.tell()) % ALIGN:   # zipfile wrote another header size: a bug
                raise AssertionError(f"{name}: data not aligned, local header ends at {self.f.tell()}")
            w.write(header.getvalue())
            for c in chunks:
                c = np.ascontiguousarray(c, dtype=dtype)
                w.write(c.reshape(-1).view(np.uint8))
                written += c.nbytes
        if written != want:   # the caller's chunks must add up to the header's shape: a bug if not
            raise AssertionError(f"{name}: wrote {written} bytes of data, its header says {want}")


def _padding(data_start: int) -> bytes:
    """An extra-field record that moves the data at `data_start` to the next ALIGN boundary."""
    pad = -data_start % ALIGN
    if pad == 0:
        return b""
    if pad < 4:   # a record is at least its 4-byte id and length
        pad += ALIGN
    return struct.pack("<HH", PAD_EXTRA_ID, pad - 4) + bytes(pad - 4)
