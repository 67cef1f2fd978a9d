"""Results tables as a run produces them, with bounded memory.

A day of traffic is a million requests and as many engine steps: their tables (about 150
bytes a row) cannot all be held. A TableLog holds blocks of rows up to HOLD_ROWS, then writes
the held blocks to a Parquet spool file in a private temporary directory (one row group per
block) and drops them; reading the table back goes block by block. The request table is
written in workload order (RequestLog): a request that leaves the engine before an earlier one
waits, as its Request, until the earlier one leaves.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from traces.errors import UserError


class SpoolError(UserError):
    """The temporary directory cannot take a run's spilled tables."""


class TableLog:
    """A table as blocks of rows (DataFrames of the same columns), spilled to Parquet beyond
    hold_rows rows held in memory."""
    HOLD_ROWS = 1 << 17

    def __init__(self, columns: list[str], hold_rows: int | None = None, empty: pd.DataFrame | None = None):
        self.columns = list(columns)
        self._empty = pd.DataFrame(columns=self.columns) if empty is None else empty   # no rows, typed
        self.hold_rows = self.HOLD_ROWS if hold_rows is None else hold_rows
        self._held: list[pd.DataFrame] = []
        self._held_rows = 0
        self._spool: tempfile.TemporaryDirectory | None = None   # removed with this object
        self._files: list[Path] = []
        self._rows = 0
        self._schema = None
        self._dtypes: dict | None = None   # the first block's: what a block read back is cast to

    @classmethod
    def of(cls, df: pd.DataFrame) -> TableLog:
        """A table of one block, held."""
        t = cls(list(df.columns), hold_rows=len(df) + 1, empty=df.iloc[:0])
        t.append(df)
        return t

    def __len__(self) -> int:
        return self._rows

    @property
    def spilled(self) -> bool:
        return bool(self._files)

    def append(self, block: pd.DataFrame) -> None:
        if not len(block):
            return
        if list(block.columns) != self.columns:
            raise ValueError(f"block columns {list(block.columns)} are not the table's {self.columns}")
        if self._dtypes is None:
            self._dtypes = block.dtypes.to_dict()
        self._held.append(block)
        self._held_rows += len(block)
        self._rows += len(block)
        if self._held_rows >= self.hold_rows:
            self._spill()

    def _arrow(self, block: pd.DataFrame):
        import pyarrow as pa
        t = pa.Table.from_pandas(block, preserve_index=False)
        if self._schema is None:
            self._schema = t.schema
        return t.cast(self._schema)   # a block whose string column is all "" or float column all NaN

    def _spill(self) -> None:
        import pyarrow.parquet as pq
        try:
            if self._spool is None:
                self._spool = tempfile.TemporaryDirectory(prefix="emoe-spool-")
            path = Path(self._spool.name) / f"part-{len(self._files):05d}.parquet"
            tables = [self._arrow(b) for b in self._held]
            with pq.ParquetWriter(path, tables[0].schema) as w:
                for t in tables:
                    w.write_table(t)
        except OSError as e:   # (Arrow's IO errors are OSErrors too)
            raise SpoolError(f"cannot write the results spool in {tempfile.gettempdir()} ({e}); point TMPDIR at a "
                             "directory with room (a million requests need about 0.3 GB)") from None
        self._files.append(path)
        self._held, self._held_rows = [], 0

    def _spilled(self, columns: list[str] | None, dictionary: list[str] | None = None):
        """The spilled row groups in order, as Arrow tables (`dictionary`: string columns read
        dictionary-encoded, no Python string a row)."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        for path in self._files:
            f = pq.ParquetFile(path, read_dictionary=dictionary)
            for i in range(f.num_row_groups):
                yield f.read_row_group(i, columns=columns)
            pa.default_memory_pool().release_unused()   # (Arrow's allocator would keep what it freed)

    def blocks(self, columns: list[str] | None = None):
        """The table's blocks in order, as DataFrames (only `columns`, if given)."""
        for t in self._spilled(columns):
            yield self._typed(t.to_pandas())
        for b in self._held:
            yield b if columns is None else b[columns]

    def _typed(self, df: pd.DataFrame) -> pd.DataFrame:
        """A spilled block with the dtypes it was appended with (Parquet keeps numbers' types;
        this guards the rest)."""
        for c in df.columns:
            if df[c].dtype != self._dtypes[c]:
                df[c] = df[c].astype(self._dtypes[c])
        return df

    def column(self, name: str) -> np.ndarray:
        """One column, whole, as an array (a summary's statistics need every value)."""
        parts = [b[name].to_numpy() for b in self.blocks([name])]
        return np.concatenate(parts) if parts else np.array([])

    def categories(self, name: str) -> pd.Categorical:
        """A string column, whole, as categories (sorted). Spilled blocks are read dictionary-
        encoded, so no Python string is made per row: a million requests' task names as
        objects would cost ~60 MB at their peak, their codes 1 MB."""
        from pandas.api.types import union_categoricals
        parts = [pd.Categorical(t.column(0).to_pandas()) for t in self._spilled([name], dictionary=[name])]
        parts += [pd.Categorical(b[name]) for b in self._held]
        return union_categoricals(parts, sort_categories=True) if parts else pd.Categorical([])

    def frame(self, columns: list[str] | None = None) -> pd.DataFrame:
        """The whole table in memory (a user asking for it; a run never does)."""
        parts = list(self.blocks(columns))
        if not parts:
            return (self._empty if columns is None else self._empty[columns]).copy()
        # a copy: what the caller changes is not what the run writes
        return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0].reset_index(drop=True).copy()

    def write(self, parquet: Path | None, csv: Path) -> None:
        """The table as CSV (and Parquet, if a path is given), block by block."""
        writer = None
        try:
            for i, b in enumerate(self.blocks()):
                b.to_csv(csv, index=False, header=i == 0, mode="w" if i == 0 else "a")
                if parquet is not None:
                    import pyarrow.parquet as pq
                    t = self._arrow(b)
                    if writer is None:
                        writer = pq.ParquetWriter(parquet, t.schema)
                    writer.write_table(t)
            if not len(self):
                self._empty.to_csv(csv, index=False)
                if parquet is not None:
                    self._empty.to_parquet(parquet, index=False)
        finally:
            if writer is not None:
                writer.close()


class RequestLog:
    """The request table, filled as requests leave the engine, in workload order (by
    `Request.index`). Requests are tabled BLOCK at a time, then dropped."""
    BLOCK = 8192

    def __init__(self, hold_rows: int | None = None):
        from sim.results import REQUEST_COLUMNS, request_table
        self.table = TableLog(list(REQUEST_COLUMNS), hold_rows, empty=request_table([]))
        self._early: dict[int, object] = {}   # left before an earlier request: index -> Request
        self._ready: list = []
        self._next = 0

    def add(self, req) -> None:
        self._early[req.index] = req
        while self._next in self._early:
            self._ready.append(self._early.pop(self._next))
            self._next += 1
        if len(self._ready) >= self.BLOCK:
            self._table()

    def _table(self) -> None:
        from sim.results import request_table
        self.table.append(request_table(self._ready))
        self._ready = []

    def close(self, rest) -> TableLog:
        """Table the requests still in the engine or not yet arrived (a run stopped at a
        limit), then everything left, in index order."""
        for r in rest:
            self.add(r)
        self._ready += [self._early[i] for i in sorted(self._early)]
        self._early = {}
        if self._ready:
            self._table()
        return self.table
