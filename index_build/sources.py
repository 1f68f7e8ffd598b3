"""Reader stage: tile sources -> validated list of TileRecord.

Two sources:
  * a catalogue CSV with header `tile_id,lat,lon,path` (any column order, extra columns kept as
    metadata, `path` relative to the CSV's directory or absolute);
  * a slippy-map directory `{z}/{x}/{y}.png|jpg|jpeg` (tile id `z-x-y`: no slashes, so that it can
    sit in a URL path such as the service's /tiles/{tile_id}; centre lat/lon from the Web-Mercator
    maths; extra columns `z,x,y`).

Every problem is collected into one ValidationReport (line numbers for CSV rows, paths for
slippy tiles); nothing is dropped silently. Image *contents* are checked later, while encoding
(`--skip-bad`), because decoding every image twice would double the cost of a country-sized build.
"""
from __future__ import annotations

import bisect
import csv
import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

from index_build.webmercator import MAX_ZOOM, tile_center_latlon

REQUIRED_COLUMNS = ("tile_id", "lat", "lon", "path")
# Columns the artifact's tiles.csv writes itself; a catalogue may not bring its own.
RESERVED_COLUMNS = ("source",)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
QUOTE_LIMIT = 60  # characters of a cell or header quoted in a problem (a binary file's "header" is kilobytes)


def quoted(text: str, limit: int = QUOTE_LIMIT) -> str:
    """repr(text) for a message, cut after `limit` characters and saying how long it was."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


@dataclass(frozen=True)
class TileRecord:
    tile_id: str
    lat: float
    lon: float
    source: str                  # absolute path of the image
    extra: tuple[str, ...] = ()  # values of Catalogue.extra_columns, in order
    where: str = ""              # "line 17" (CSV) or the relative path (slippy), for reports
    line: int | None = None      # first line of the row in the CSV (None: slippy)


@dataclass(frozen=True)
class Issue:
    where: str      # "line 17" or a path
    tile_id: str    # may be "" when the row has none
    problem: str

    def __str__(self) -> str:
        tid = f" tile_id={quoted(self.tile_id)}" if self.tile_id else ""
        return f"{self.where}{tid}: {self.problem}"


@dataclass
class Catalogue:
    records: list[TileRecord]
    extra_columns: list[str]
    source: str                  # "csv:/abs/path/tiles.csv" or "slippy:/abs/dir"
    sha256: str                  # checksum of the catalogue (CSV bytes, or the slippy listing)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)


class CatalogueError(Exception):
    """The catalogue failed validation; `issues` lists every offending row."""

    def __init__(self, source: str, issues: Sequence[Issue], total_rows: int):
        self.source = source
        self.issues = list(issues)
        self.total_rows = total_rows
        self.report_path: str | None = None         # where the full report was written
        self.report_unwritten: str | None = None    # why it could not be written there
        super().__init__(self.report(limit=50))

    def report(self, limit: int | None = None) -> str:
        shown = self.issues if limit is None else self.issues[:limit]
        lines = [f"catalogue {self.source}: {len(self.issues)} problem(s) in {self.total_rows} row(s); "
                 f"nothing was encoded"]
        lines += [f"  {issue}" for issue in shown]
        if limit is not None and len(self.issues) > limit:
            where = f" {self.report_path}" if self.report_path else " the report file"
            lines.append(f"  ... and {len(self.issues) - limit} more (full list in{where})")
        return "\n".join(lines)


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _parse_coordinate(text: str, name: str, lo: float, hi: float) -> tuple[float | None, str | None]:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None, f"{name} {quoted(text)} is not a number"
    if not math.isfinite(value):
        return None, f"{name} {quoted(text)} is not finite"
    if not lo <= value <= hi:
        return None, f"{name} {value} outside [{lo:g}, {hi:g}]"
    return value, None


def _utf8_lines(f, source: str) -> Iterator[str]:
    """The lines of a text file opened as UTF-8; a file that is not UTF-8 (a checkpoint or an
    image given as --catalog, a spreadsheet saved as Latin-1) becomes a CatalogueError."""
    line = 0
    try:
        for line, text in enumerate(f, start=1):
            yield text
    except UnicodeDecodeError:
        # the file is decoded a block at a time, so the bad byte is at or after this line
        raise CatalogueError(source, [Issue(f"line {line + 1}", "", "not UTF-8 text (at or after this line); "
                                                                    "a catalogue is a UTF-8 CSV file")], 0) from None


def read_catalogue_csv(csv_path: str, check_files: bool = True) -> Catalogue:
    """Read and validate a catalogue CSV. Raises CatalogueError listing every bad row."""
    csv_path = os.path.abspath(csv_path)
    base_dir = os.path.dirname(csv_path)
    source = f"csv:{csv_path}"
    issues: list[Issue] = []
    records: list[TileRecord] = []
    first_line_of: dict[str, int] = {}
    rows_seen = 0

    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(_utf8_lines(f, source))
        try:
            header = next(reader)
        except StopIteration:
            raise CatalogueError(source, [Issue("line 1", "", "empty file, expected a header "
                                                 + ",".join(REQUIRED_COLUMNS))], 0) from None
        header = [h.strip() for h in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        dup_cols = sorted({h for h in header if header.count(h) > 1})
        reserved = [c for c in RESERVED_COLUMNS if c in header]
        header_problems = []
        if missing:
            header_problems.append(f"header lacks column(s) {', '.join(missing)} "
                                   f"(need {','.join(REQUIRED_COLUMNS)}; got {quoted(','.join(header))})")
        if dup_cols:
            header_problems.append(f"header repeats column(s) {quoted(', '.join(dup_cols))}")
        if reserved:
            header_problems.append(f"column(s) {', '.join(reserved)} are reserved for the artifact; rename them")
        if header_problems:
            raise CatalogueError(source, [Issue("line 1", "", p) for p in header_problems], 0)

        col = {name: header.index(name) for name in REQUIRED_COLUMNS}
        extra_columns = [h for h in header if h not in REQUIRED_COLUMNS]
        extra_idx = [header.index(h) for h in extra_columns]

        prev_line = reader.line_num
        for row in reader:
            start_line = prev_line + 1
            prev_line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue  # blank line: not a row
            rows_seen += 1
            where = f"line {start_line}"
            if len(row) != len(header):
                tid = row[col["tile_id"]].strip() if len(row) > col["tile_id"] else ""
                issues.append(Issue(where, tid, f"malformed row: {len(row)} field(s), header has {len(header)}"))
                continue
            tile_id = row[col["tile_id"]].strip()
            row_problems = []
            if not tile_id:
                row_problems.append("empty tile_id")
            elif any(ch in tile_id for ch in "\r\n"):
                row_problems.append("tile_id contains a line break")
            lat, err = _parse_coordinate(row[col["lat"]].strip(), "lat", -90.0, 90.0)
            if err:
                row_problems.append(err)
            lon, err = _parse_coordinate(row[col["lon"]].strip(), "lon", -180.0, 180.0)
            if err:
                row_problems.append(err)
            rel = row[col["path"]].strip()
            abs_path = ""
            if not rel:
                row_problems.append("empty path")
            else:
                abs_path = os.path.normpath(os.path.join(base_dir, rel))
                if check_files and not os.path.isfile(abs_path):
                    row_problems.append(f"missing file {abs_path}")
            if tile_id:
                if tile_id in first_line_of:
                    row_problems.append(f"duplicate tile_id (first seen on line {first_line_of[tile_id]})")
                else:
                    first_line_of[tile_id] = start_line
            if row_problems:
                issues.extend(Issue(where, tile_id, p) for p in row_problems)
                continue
            records.append(TileRecord(tile_id, lat, lon, abs_path, tuple(row[i] for i in extra_idx), where,
                                      start_line))

    if issues:
        raise CatalogueError(source, issues, rows_seen)
    if not records:
        raise CatalogueError(source, [Issue(f"line {prev_line + 1}", "", "no rows after the header: the catalogue "
                                                                        "lists no tiles")], 0)
    return Catalogue(records, extra_columns, source, sha256_file(csv_path))


class CatalogueLines:
    """Row index of the validated tiles -> line of the catalogue CSV, so that errors found after
    validation (unreadable images) name the same lines as validation does. Stored in the build's
    plan as runs `[row, line]`: from `row` on, row r sits on line `line + r - row`; a new run starts
    only after a blank line or a quoted line break, so a plain CSV is one run."""

    def __init__(self, runs: Sequence[Sequence[int]] = ()):
        self.runs = [(int(row), int(line)) for row, line in runs]
        self._starts = [row for row, _ in self.runs]

    @classmethod
    def of_records(cls, records: Sequence[TileRecord]) -> "CatalogueLines":
        runs: list[tuple[int, int]] = []
        for row, record in enumerate(records):
            if record.line is None:  # a slippy-map directory has paths, not lines
                return cls()
            if not runs or record.line != runs[-1][1] + row - runs[-1][0]:
                runs.append((row, record.line))
        return cls(runs)

    def line(self, row: int) -> int | None:
        k = bisect.bisect_right(self._starts, row) - 1
        if k < 0:
            return None
        start, line = self.runs[k]
        return line + row - start

    def to_json(self) -> list[list[int]]:
        return [[row, line] for row, line in self.runs]


def slippy_tile_id(z: int, x: int, y: int) -> str:
    return f"{z}-{x}-{y}"


_SLIPPY_PART = re.compile(r"^(0|[1-9][0-9]*)$")


def read_slippy_dir(root: str, check_files: bool = True) -> Catalogue:
    """Read a `{z}/{x}/{y}.png|jpg|jpeg` tree. Tile id "z-x-y", centre of the tile as lat/lon."""
    root = os.path.abspath(root)
    source = f"slippy:{root}"
    if not os.path.isdir(root):
        raise CatalogueError(source, [Issue(root, "", "not a directory")], 0)
    issues: list[Issue] = []
    found: dict[tuple[int, int, int], str] = {}
    listing = hashlib.sha256()
    ignored = 0
    images_seen = 0
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            entries.append(os.path.join(dirpath, name))
    for path in entries:
        rel = os.path.relpath(path, root)
        stem, ext = os.path.splitext(rel)
        if ext.lower() not in IMAGE_EXTENSIONS:
            ignored += 1
            continue
        images_seen += 1
        try:
            size = os.path.getsize(path)
        except OSError as exc:
            issues.append(Issue(rel, "", f"cannot stat: {exc}"))
            continue
        listing.update(f"{rel}\t{size}\n".encode())
        parts = stem.split(os.sep)
        if len(parts) != 3 or not all(_SLIPPY_PART.match(p) for p in parts):
            issues.append(Issue(rel, "", "not a {z}/{x}/{y} tile path"))
            continue
        z, x, y = (int(p) for p in parts)
        tid = slippy_tile_id(z, x, y)
        if z > MAX_ZOOM or not (x < 2 ** z and y < 2 ** z):
            issues.append(Issue(rel, tid, f"tile outside the zoom-{z} grid (x, y must be < {2 ** z})"
                                if z <= MAX_ZOOM else f"zoom {z} > {MAX_ZOOM}"))
            continue
        if (z, x, y) in found:
            issues.append(Issue(rel, tid, f"duplicate tile (also {os.path.relpath(found[(z, x, y)], root)})"))
            continue
        if check_files and size == 0:
            issues.append(Issue(rel, tid, "empty file"))
            continue
        found[(z, x, y)] = path
    if issues:
        raise CatalogueError(source, issues, images_seen)
    if not found:
        raise CatalogueError(source, [Issue(root, "", "no tiles: no {z}/{x}/{y}.png|jpg|jpeg file in it")], 0)
    records = []
    for (z, x, y), path in sorted(found.items()):
        lat, lon = tile_center_latlon(z, x, y)
        records.append(TileRecord(slippy_tile_id(z, x, y), lat, lon, path, (str(z), str(x), str(y)),
                                  os.path.relpath(path, root)))
    notes = []
    if ignored:
        notes.append(f"ignored {ignored} non-image file(s) under {root}")
    return Catalogue(records, ["z", "x", "y"], source, listing.hexdigest(), notes)


def read_source(path: str, check_files: bool = True) -> Catalogue:
    """A catalogue CSV file or a slippy-map directory, chosen by what `path` is."""
    if os.path.isdir(path):
        return read_slippy_dir(path, check_files=check_files)
    return read_catalogue_csv(path, check_files=check_files)


# ---- the normalised catalogue file passed between stages (also the artifact's tiles.csv) ----

def tiles_header(extra_columns: Sequence[str]) -> list[str]:
    return ["tile_id", "lat", "lon", "source", *extra_columns]


def write_tiles_csv(path: str, records: Iterable[TileRecord], extra_columns: Sequence[str]) -> int:
    """Write tile_id,lat,lon,source[,extra] (floats with repr: exact round trip). Returns rows written."""
    n = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(tiles_header(extra_columns))
        for r in records:
            w.writerow([r.tile_id, repr(float(r.lat)), repr(float(r.lon)), r.source, *r.extra])
            n += 1
        f.flush()
        os.fsync(f.fileno())
    return n


def read_tiles_csv(path: str) -> tuple[list[TileRecord], list[str]]:
    """Read a file written by write_tiles_csv (the stage file or the artifact's tiles.csv)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        if header[:4] != ["tile_id", "lat", "lon", "source"]:
            raise ValueError(f"{path}: unexpected header {header}")
        extra = header[4:]
        records = [TileRecord(row[0], float(row[1]), float(row[2]), row[3], tuple(row[4:])) for row in reader]
    return records, extra
