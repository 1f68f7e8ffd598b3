"""Mapper stage, shared by both engines: image decoding, shard-aligned batching, bad-image errors.

Batches never cross a shard boundary and always start at the shard's first row, so the local and
the Ray engine (and a resumed build) feed the model exactly the same batches and write identical
shard files.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import numpy as np
import torch

from index_build.workdir import ShardSpan


class PathTable:
    """Image paths as one bytes blob + offsets.

    DataLoader workers are forked; a Python list of a million str objects would be copied page by
    page as workers touch the refcounts. Two numpy arrays are shared as they are.
    """

    def __init__(self, paths: Sequence[str]):
        encoded = [p.encode("utf-8", "surrogateescape") for p in paths]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")


def no_columns(encoder) -> np.ndarray | None:
    """The column features of zero tiles: [0, columns, C] float32 (model.inference.InferenceEncoder.column_shape),
    or None without an orientation head."""
    shape = encoder.column_shape
    return None if shape is None else np.zeros((0, *shape), np.float32)


def decode_tile(path: str, config) -> tuple[torch.Tensor | None, str]:
    """(uint8 [3, H, W] model-size aerial image, "") or (None, reason) for one tile image; never
    raises for bad image data. Kept as uint8 (4x less to pass between processes); a whole batch
    is normalised at once by `model.preprocess.normalize_uint8_nchw`. The reason leaves out the
    path: every report of a bad tile names it beside the reason."""
    from model.preprocess import ImageDecodeError, aerial_image, image_uint8, load_image
    try:
        return image_uint8(aerial_image(load_image(path), config)), ""
    except Exception as exc:  # ImageDecodeError, OSError, odd sizes: all become a reported skip
        reason = str(exc)
        if reason.startswith(f"{path}: "):
            reason = reason[len(path) + 2:]
        reason = reason.replace(f" {path!r}", "").replace(f" {path}", "")  # PIL quotes the file name again
        return None, reason if isinstance(exc, ImageDecodeError) else f"{type(exc).__name__}: {reason}"


class TileImageDataset(torch.utils.data.Dataset):
    """Row -> (row, [3,H,W] uint8 aerial image or zeros, error text). Runs in DataLoader workers."""

    def __init__(self, paths: PathTable, config):
        self.paths = paths
        self.config = config
        self.shape = (3, *config.aerial_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int):
        tensor, error = decode_tile(self.paths[row], self.config)
        if tensor is None:
            tensor = torch.zeros(self.shape, dtype=torch.uint8)
        return row, tensor, error


def collate_tiles(items):
    rows = [it[0] for it in items]
    return rows, torch.stack([it[1] for it in items]), [it[2] for it in items]


def shard_batches(span: ShardSpan, batch_size: int) -> Iterator[list[int]]:
    for s in range(span.start, span.stop, batch_size):
        yield list(range(s, min(s + batch_size, span.stop)))


class ShardAlignedBatches:
    """Batch sampler over the shards still to encode (lazy: a billion rows never become lists)."""

    def __init__(self, spans: Sequence[ShardSpan], batch_size: int):
        self.spans = list(spans)
        self.batch_size = batch_size

    def __iter__(self):
        for span in self.spans:
            yield from shard_batches(span, self.batch_size)

    def __len__(self) -> int:
        return sum(-(-len(s) // self.batch_size) for s in self.spans)


@dataclass
class BadTile:
    row: int                    # 0-based row of the catalogue's tiles (the shard plan's numbering)
    tile_id: str
    source: str
    error: str
    line: int | None = None     # line of the catalogue CSV, once known (None for a slippy-map directory)

    def to_json(self) -> dict:
        out = {"row": self.row, "tile_id": self.tile_id, "source": self.source, "error": self.error}
        if self.line is not None:
            out["line"] = self.line
        return out

    def __str__(self) -> str:
        where = f"line {self.line} " if self.line is not None else ""
        return f"{where}tile_id={self.tile_id!r} {self.source}: {self.error}"


class EncoderFailed(RuntimeError):
    """A distributed encoder failed (its cause named): the shards it finished are kept for --resume."""


class BadImagesError(RuntimeError):
    """Unreadable tile images while --skip-bad is off. Finished shards are kept for --resume.

    The encoders only know plan rows; the build names the catalogue and its lines (`locate`)
    before the error reaches the user, so that it speaks of the same lines as validation."""

    def __init__(self, bad: Sequence[BadTile], catalogue: str = ""):
        self.bad = list(bad)
        self.catalogue = catalogue
        super().__init__(self.bad)

    def locate(self, line_of_row, catalogue: str) -> None:
        self.bad = [replace(b, line=line_of_row(b.row)) for b in self.bad]
        self.catalogue = catalogue

    def __str__(self) -> str:
        of = f" of catalogue {self.catalogue}" if self.catalogue else ""
        lines = [f"{len(self.bad)} tile image(s){of} could not be read:"]
        lines += [f"  {b}" for b in self.bad[:50]]
        if len(self.bad) > 50:
            lines.append(f"  ... and {len(self.bad) - 50} more")
        lines.append("Fix or remove them, or re-run with --resume --skip-bad to skip them (they are then "
                     "counted and listed in the manifest); finished shards are kept.")
        return "\n".join(lines)


@dataclass
class EncodeStats:
    shards_total: int = 0
    shards_reused: int = 0
    shards_encoded: int = 0
    tiles_encoded: int = 0      # images that went through the model in this run
    tiles_skipped: int = 0      # unreadable images skipped in this run
    encode_s: float = 0.0       # decoding + encoding the tiles after the warm-up: what tiles_per_second is over

    @property
    def tiles_per_second(self) -> float:
        return self.tiles_encoded / self.encode_s if self.encode_s > 0 else 0.0

    def to_json(self) -> dict:
        return {**self.__dict__, "encode_s": round(self.encode_s, 3),
                "tiles_per_second": round(self.tiles_per_second, 2)}
