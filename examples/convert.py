"""An async job in weighted stages: convert a CSV file to gzipped JSON Lines.

``JOBS_MODULE=examples.convert`` registers the ``convert`` type. It works on temporary files it
makes itself (the "download" stage writes the input, standing in for fetching it), so it runs
anywhere without network. The blocking file work runs chunk by chunk in a thread
(``asyncio.to_thread``), so the worker's event loop stays free for other jobs and for the lease
renewals, and a cancel takes effect at the next chunk.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import hashlib
import json
import tempfile
from pathlib import Path
from typing import IO

from pydantic import BaseModel, Field

from worker.registry import job
from worker.stages import Stages

# Relative time each stage takes (converting is the bulk of it).
STAGES = {"download": 1, "convert": 6, "compress": 2, "checksum": 1}
BLOCK = 256 * 1024  # bytes compressed or hashed per progress report
FIELDS = ("id", "name", "qty", "price")


class ConvertParams(BaseModel):
    """A CSV to JSON Lines conversion."""

    model_config = {"extra": "forbid"}

    rows: int = Field(5000, ge=1, le=2_000_000, description="rows in the input file")
    chunk_rows: int = Field(500, ge=1, le=100_000, description="rows converted per progress report")
    corrupt_every: int | None = Field(None, ge=1, description="make every Nth input row malformed")
    strict: bool = Field(False, description="fail on a malformed row instead of skipping it")
    delay: float = Field(0.0, ge=0, le=5, description="extra seconds per chunk, to follow it in a UI")


@job("convert", params=ConvertParams, timeout=600, max_tries=2, backoff=2.0)
async def convert(ctx, params: ConvertParams) -> dict:
    """Convert a generated CSV file to gzipped JSON Lines: download, convert, compress, checksum."""
    stages = Stages(ctx, STAGES)
    with tempfile.TemporaryDirectory(prefix="convert-") as tmp:
        source, lines, packed = Path(tmp) / "input.csv", Path(tmp) / "output.jsonl", Path(tmp) / "output.jsonl.gz"

        await stages.enter("download", message="fetching the input")
        chunks = [(start, min(start + params.chunk_rows, params.rows)) for start in range(0, params.rows, params.chunk_rows)]
        for i, (start, stop) in enumerate(chunks, 1):
            await asyncio.to_thread(write_rows, source, start, stop, params.corrupt_every)
            await stages.step(i, len(chunks), message=f"downloaded {stop} of {params.rows} rows")

        await stages.enter("convert", message="converting")
        converted = skipped = 0
        with open(source, newline="") as src, open(lines, "w") as out:
            reader = csv.reader(src)
            next(reader)  # the header
            for i in range(1, len(chunks) + 1):
                done, bad = await asyncio.to_thread(convert_rows, reader, out, params.chunk_rows, params.strict, converted + skipped)
                converted, skipped = converted + done, skipped + bad
                await asyncio.sleep(params.delay)
                await stages.step(i, len(chunks), message=f"converted {converted} rows, skipped {skipped}")

        await stages.enter("compress", message="compressing")
        total = lines.stat().st_size
        with open(lines, "rb") as src, gzip.GzipFile(packed, "wb", mtime=0) as out:  # mtime=0: same input, same bytes
            while block := await asyncio.to_thread(src.read, BLOCK):
                await asyncio.to_thread(out.write, block)
                await stages.step(src.tell(), total, message=f"compressed {src.tell()} of {total} bytes")

        await stages.enter("checksum", message="checksumming")
        digest, size = hashlib.sha256(), packed.stat().st_size
        with open(packed, "rb") as src:
            while block := await asyncio.to_thread(src.read, BLOCK):
                digest.update(block)
                await stages.step(src.tell(), size)

        return {
            "rows": converted,
            "skipped": skipped,
            "bytes_in": source.stat().st_size,
            "bytes_out": size,
            "sha256": digest.hexdigest(),
        }


def write_rows(path: Path, start: int, stop: int, corrupt_every: int | None) -> None:
    """Append rows ``start..stop-1`` of the input (with the header first); every
    ``corrupt_every``-th row (1-based) has a quantity that is not a number."""
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if start == 0:
            writer.writerow(FIELDS)
        for n in range(start + 1, stop + 1):
            qty = "many" if corrupt_every and n % corrupt_every == 0 else n % 97
            writer.writerow((n, f"item-{n}", qty, f"{n * 37 % 10_000 / 100:.2f}"))


def convert_rows(reader, out: IO[str], count: int, strict: bool, seen: int) -> tuple[int, int]:
    """Convert up to ``count`` CSV rows to JSON lines; return (converted, skipped).
    A malformed row raises ``ValueError`` naming it when ``strict``, else it is skipped."""
    done = bad = 0
    for row_number, row in enumerate(reader, seen + 1):
        try:
            if len(row) != len(FIELDS):
                raise ValueError(f"expected {len(FIELDS)} fields, got {len(row)}")
            record = {"id": int(row[0]), "name": row[1], "qty": int(row[2]), "price": float(row[3])}
        except ValueError as e:
            if strict:
                raise ValueError(f"row {row_number}: {e}") from None
            bad += 1
        else:
            out.write(json.dumps(record) + "\n")
            done += 1
        if done + bad == count:
            break
    return done, bad
