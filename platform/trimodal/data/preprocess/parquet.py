"""The Parquet writer: the images table's schema, and a sink that writes row groups and files of a set size,
in arrival order (same rows in, same bytes out)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TARGET_FILE_BYTES = 256 << 20
TARGET_GROUP_BYTES = 64 << 20


def image_schema(num_patches: int, hidden_size: int) -> pa.Schema:
    """Schema of OUT/images: the embedding is Ray Data's fixed-shape tensor extension type, float16."""
    from ray.data.extensions import ArrowTensorTypeV2

    return pa.schema([("image_id", pa.int64()), ("embedding", ArrowTensorTypeV2((num_patches, hidden_size),
                                                                                pa.float16())),
                      ("width", pa.int32()), ("height", pa.int32()), ("file_name", pa.string()),
                      ("split", pa.string())])


class ParquetSink:
    """Writes tables, in arrival order, as DIR/part-00000.parquet, ... with row groups of `rows_per_group` rows
    and `groups_per_file` row groups per file. Same rows in, same bytes out."""

    def __init__(self, directory: Path, schema: pa.Schema, rows_per_group: int, groups_per_file: int = 4):
        self.directory, self.schema = directory, schema
        self.rows_per_group, self.groups_per_file = max(1, rows_per_group), max(1, groups_per_file)
        self.pending: list[pa.Table] = []
        self.pending_rows = self.rows = self.groups = 0
        self.files = 0
        self.writer: pq.ParquetWriter | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, table: pa.Table) -> None:
        self.pending.append(table.select(self.schema.names).cast(self.schema))
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.rows_per_group:
            self._flush(self.rows_per_group)

    def _flush(self, n: int) -> None:
        merged = pa.concat_tables(self.pending) if self.pending else self.schema.empty_table()
        group, rest = merged.slice(0, n), merged.slice(n)
        self.pending, self.pending_rows = [rest], rest.num_rows
        if self.writer is None or self.groups == self.groups_per_file:
            self._next_file()
        self.writer.write_table(group, row_group_size=max(n, 1))
        self.groups += 1
        self.rows += n

    def _next_file(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer = pq.ParquetWriter(self.directory / f"part-{self.files:05d}.parquet", self.schema)
        self.files += 1
        self.groups = 0

    def close(self) -> int:
        """Flush and close; an empty table still gets one (empty) file so readers see the schema."""
        if self.pending_rows or self.writer is None:
            self._flush(self.pending_rows)
        self.writer.close()
        return self.rows


def rows_per_group(row_bytes: int, target: int = TARGET_GROUP_BYTES) -> int:
    """Rows in a row group of about `target` bytes."""
    return max(1, target // max(1, row_bytes))


def write_table(table: pa.Table, directory: Path, rows_per_group: int = 200_000) -> int:
    """Write a table held in memory (captions, conversations) with the sink; returns the row count."""
    sink = ParquetSink(directory, table.schema, rows_per_group)
    sink.write(table)
    return sink.close()
