"""Dataset readers: the synthetic world layout (``python -m worldgen``), CVUSA and CVACT.

Every reader returns a list of :class:`PairRecord` and validates eagerly: a split file that is
missing, a malformed line, or an image file that does not exist raises :class:`DatasetError`
naming the file (and line) at construction time, not later inside a data-loader worker.
Images that exist but cannot be decoded are reported by :class:`PairDataset` at load time, again
naming the file.

Layouts
-------
synthetic  ``DIR/splits/{train,val}.csv`` with header ``id,aerial,ground,lat,lon`` (paths relative
           to DIR; lat/lon: the camera), optionally ``,tile_lat,tile_lon``: the tile's centre where the
           camera is not at it (``scripts/grid_pairs.py``); split ``all`` = train + val.
cvusa      ``DIR/splits/{train,val}-19zl.csv``, lines ``bingmap/19/x.jpg,streetview/panos/x.jpg,annotations/...``
           (no header). With ``polar=True`` the aerial path becomes ``polarmap/19/x.png`` (the SAFA
           pre-computed polar images); such records carry ``aerial_is_polar=True``.
cvact      ``DIR/ACT_data.mat`` with ``panoIds``, ``utm``, ``trainSet.trainInd``, ``valSet.valInd``,
           ``valSetAll.valInd`` (1-based); images ``streetview/<id>_grdView.<ext>`` and
           ``satview_polish/<id>_satView_polish.<ext>``. Splits ``train``, ``val``, ``valAll``.
           CVACT gives UTM coordinates, not lat/lon, so ``lat``/``lon`` are None (``utm`` is kept).
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

__all__ = ["DatasetError", "PairRecord", "PairDataset", "read_synthetic", "read_cvusa", "read_cvact",
           "load_split", "DATASETS"]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DatasetError(ValueError):
    """A data set cannot be read; the message names the file (and line) at fault."""


@dataclass(frozen=True)
class PairRecord:
    id: str
    ground_path: str
    aerial_path: str
    lat: float | None = None
    lon: float | None = None
    aerial_is_polar: bool = False
    utm: tuple | None = None
    tile_lat: float | None = None  # the aerial tile's centre where the camera is not at it (a grid region)
    tile_lon: float | None = None


# --------------------------------------------------------------------------- helpers

def _need_file(path: Path, where: str) -> None:
    if not path.is_file():
        raise DatasetError(f"{where}: image file {path} does not exist")


def _float(text: str, name: str, where: str, lo: float, hi: float) -> float:
    try:
        v = float(text)
    except ValueError:
        raise DatasetError(f"{where}: {name} {text!r} is not a number") from None
    if not math.isfinite(v) or not (lo <= v <= hi):
        raise DatasetError(f"{where}: {name} {v} is out of range [{lo}, {hi}]")
    return v


def _check_rel(rel: str, where: str, column: str) -> None:
    if not rel:
        raise DatasetError(f"{where}: empty {column} path")
    if os.path.isabs(rel) or ".." in Path(rel).parts:
        raise DatasetError(f"{where}: {column} path {rel!r} must be relative to the data set root")
    if not rel.lower().endswith(IMAGE_EXTS):
        raise DatasetError(f"{where}: {column} path {rel!r} is not an image file name")


# --------------------------------------------------------------------------- synthetic world

SYNTHETIC_HEADER = ["id", "aerial", "ground", "lat", "lon"]
TILE_CENTRE_COLUMNS = ["tile_lat", "tile_lon"]  # optional: scripts/grid_pairs.py writes them


def read_synthetic(root, split: str = "train", check_files: bool = True) -> list[PairRecord]:
    """Records of ``split`` (train | val | all) of a world written by ``python -m worldgen``."""
    root = Path(root)
    if split == "all":
        return read_synthetic(root, "train", check_files) + read_synthetic(root, "val", check_files)
    path = root / "splits" / f"{split}.csv"
    if not path.is_file():
        have = sorted(p.stem for p in (root / "splits").glob("*.csv")) if (root / "splits").is_dir() else []
        raise DatasetError(f"split file {path} does not exist (splits present: {', '.join(have) or 'none'}; "
                           f"is {root} a worldgen directory?)")
    records: list[PairRecord] = []
    seen: set[str] = set()
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DatasetError(f"{path}: empty file (expected header {','.join(SYNTHETIC_HEADER)})")
        columns = [h.strip() for h in header]
        if columns not in (SYNTHETIC_HEADER, SYNTHETIC_HEADER + TILE_CENTRE_COLUMNS):
            raise DatasetError(f"{path}:1: header {','.join(header)!r} != {','.join(SYNTHETIC_HEADER)!r} "
                               f"(optionally followed by {','.join(TILE_CENTRE_COLUMNS)})")
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            where = f"{path}:{lineno}"
            if len(row) != len(columns):
                raise DatasetError(f"{where}: expected {len(columns)} columns ({','.join(columns)}), got {len(row)}")
            pid, aer, grd = (c.strip() for c in row[:3])
            if not pid:
                raise DatasetError(f"{where}: empty id")
            if pid in seen:
                raise DatasetError(f"{where}: duplicate id {pid!r}")
            seen.add(pid)
            _check_rel(aer, where, "aerial")
            _check_rel(grd, where, "ground")
            lat = _float(row[3], "lat", where, -90.0, 90.0)
            lon = _float(row[4], "lon", where, -180.0, 180.0)
            ap, gp = root / aer, root / grd
            if check_files:
                _need_file(ap, where)
                _need_file(gp, where)
            tile = (() if len(columns) == 5 else
                    (_float(row[5], "tile_lat", where, -90.0, 90.0), _float(row[6], "tile_lon", where, -180.0, 180.0)))
            records.append(PairRecord(pid, str(gp), str(ap), lat, lon, False, None, *tile))
    return records


# --------------------------------------------------------------------------- CVUSA

def read_cvusa(root, split: str = "train", polar: bool = False, check_files: bool = True) -> list[PairRecord]:
    """CVUSA subset of CVM-Net/SAFA: ``splits/{train,val}-19zl.csv``; ``polar`` uses ``polarmap/19``."""
    root = Path(root)
    if split == "all":
        return read_cvusa(root, "train", polar, check_files) + read_cvusa(root, "val", polar, check_files)
    if split not in ("train", "val"):
        raise DatasetError(f"CVUSA has splits train, val and all, not {split!r}")
    path = root / "splits" / f"{split}-19zl.csv"
    if not path.is_file():
        raise DatasetError(f"split file {path} does not exist (is {root} the CVUSA root with splits/?)")
    records: list[PairRecord] = []
    with open(path, newline="") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            where = f"{path}:{lineno}"
            parts = [p.strip() for p in line.split(",")]
            if len(parts) < 2:
                raise DatasetError(f"{where}: expected 'bingmap/...,streetview/...[,annotations/...]', got {line[:80]!r}")
            aer, grd = parts[0], parts[1]
            _check_rel(aer, where, "aerial")
            _check_rel(grd, where, "ground")
            if not aer.startswith("bingmap/"):
                raise DatasetError(f"{where}: first column {aer!r} is not under bingmap/")
            if not grd.startswith("streetview/"):
                raise DatasetError(f"{where}: second column {grd!r} is not under streetview/")
            pid = Path(grd).stem
            if polar:
                # bingmap/19/0000001.jpg -> polarmap/19/0000001.png (SAFA naming)
                sub = Path(aer).relative_to("bingmap")
                aer = str(Path("polarmap") / sub.with_suffix(".png"))
            ap, gp = root / aer, root / grd
            if check_files:
                _need_file(ap, where)
                _need_file(gp, where)
            records.append(PairRecord(pid, str(gp), str(ap), None, None, aerial_is_polar=polar))
    return records


# --------------------------------------------------------------------------- CVACT

CVACT_SPLITS = {"train": ("trainSet", "trainInd"), "val": ("valSet", "valInd"),
                "valAll": ("valSetAll", "valInd"), "val_all": ("valSetAll", "valInd")}


def _mat_field(mat: dict, top: str, field: str, path: Path):
    if top not in mat:
        raise DatasetError(f"{path}: variable {top!r} missing (have {', '.join(k for k in mat if not k.startswith('__'))})")
    s = mat[top]
    try:
        v = s[field]
    except (KeyError, ValueError, IndexError, TypeError):
        raise DatasetError(f"{path}: {top} has no field {field!r}") from None
    # struct arrays from loadmat: shape (1, 1) object wrapping the value
    while hasattr(v, "dtype") and v.dtype == object and v.size == 1:
        v = v.flat[0]
    return v


def _pano_ids(raw, path: Path) -> list[str]:
    import numpy as np

    arr = np.asarray(raw)
    out = []
    if arr.dtype.kind in "US" and arr.ndim <= 1:
        items = arr.reshape(-1).tolist()
    elif arr.dtype.kind in "US" and arr.ndim == 2 and arr.shape[1] == 1:
        items = arr[:, 0].tolist()
    elif arr.dtype == object:
        items = []
        for x in arr.reshape(-1):
            x = np.asarray(x)
            items.append(str(x.reshape(-1)[0]) if x.size else "")
    else:
        raise DatasetError(f"{path}: panoIds has unsupported type {arr.dtype} shape {arr.shape}")
    for i, s in enumerate(items):
        s = s.decode() if isinstance(s, bytes) else str(s)
        s = s.strip()
        if not s:
            raise DatasetError(f"{path}: panoIds[{i}] is empty")
        out.append(s)
    return out


def _find_image(base: Path, where: str, check: bool) -> Path:
    for ext in (".jpg", ".png", ".jpeg"):
        p = base.with_name(base.name + ext)
        if p.is_file():
            return p
    if check:
        raise DatasetError(f"{where}: image file {base}.jpg (or .png/.jpeg) does not exist")
    return base.with_name(base.name + ".jpg")


def read_cvact(root, split: str = "train", check_files: bool = True) -> list[PairRecord]:
    """CVACT (ACT_data.mat): split ``train`` | ``val`` | ``valAll`` (1-based indices in the .mat)."""
    import numpy as np

    root = Path(root)
    path = root / "ACT_data.mat"
    if split not in CVACT_SPLITS:
        raise DatasetError(f"CVACT has splits {', '.join(k for k in CVACT_SPLITS if k != 'val_all')}, not {split!r}")
    if not path.is_file():
        raise DatasetError(f"{path} does not exist (is {root} the CVACT root?)")
    try:
        from scipy.io import loadmat

        mat = loadmat(str(path))
    except Exception as exc:  # scipy raises several types for corrupt files
        raise DatasetError(f"{path}: cannot read MAT file ({type(exc).__name__}: {exc})") from None
    if "panoIds" not in mat:
        raise DatasetError(f"{path}: variable 'panoIds' missing")
    ids = _pano_ids(mat["panoIds"], path)
    utm = None
    if "utm" in mat:
        utm = np.asarray(mat["utm"], dtype=np.float64)
        if utm.ndim != 2 or utm.shape[0] != len(ids):
            raise DatasetError(f"{path}: utm has shape {utm.shape}, expected ({len(ids)}, 2)")
    top, field = CVACT_SPLITS[split]
    inds = np.asarray(_mat_field(mat, top, field, path)).reshape(-1)
    if inds.size and (not np.all(np.isfinite(inds.astype(np.float64))) or np.any(inds != np.round(inds))):
        raise DatasetError(f"{path}: {top}.{field} holds non-integer indices")
    inds = inds.astype(np.int64)
    bad = (inds < 1) | (inds > len(ids))
    if bad.any():
        raise DatasetError(f"{path}: {top}.{field} index {int(inds[bad][0])} outside 1..{len(ids)} (1-based)")
    records = []
    for i in (inds - 1).tolist():
        pid = ids[i]
        where = f"{path} ({top}.{field}, panoIds[{i}]={pid!r})"
        gp = _find_image(root / "streetview" / f"{pid}_grdView", where, check_files)
        ap = _find_image(root / "satview_polish" / f"{pid}_satView_polish", where, check_files)
        records.append(PairRecord(pid, str(gp), str(ap), None, None,
                                  utm=tuple(float(v) for v in utm[i]) if utm is not None else None))
    return records


DATASETS = {"synthetic": read_synthetic, "cvusa": read_cvusa, "cvact": read_cvact}


def load_split(dataset: str, root, split: str, **kwargs) -> list[PairRecord]:
    """``dataset`` in synthetic | cvusa | cvact -> records of ``split``."""
    try:
        fn = DATASETS[dataset]
    except KeyError:
        raise DatasetError(f"unknown dataset {dataset!r} (choose from {', '.join(DATASETS)})") from None
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data directory {root} does not exist")
    return fn(root, split, **kwargs)


# --------------------------------------------------------------------------- torch Dataset

try:
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover - torch is a hard dependency of model/
    _TorchDataset = object


class PairDataset(_TorchDataset):
    """Records -> ``{"ground": [3, *ground_size], "aerial": [3, *aerial_size], "index": i}``.

    Uses ``model.preprocess.ground_tensor`` / ``aerial_tensor`` (polar transform when the config
    asks for it). Records flagged ``aerial_is_polar`` (CVUSA polarmap/) are only resized and
    normalised. A file that cannot be read raises :class:`DatasetError` naming it.
    """

    def __init__(self, records: Sequence[PairRecord], config):
        self.records = list(records)
        self.config = config

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, path: str, rec: PairRecord, what: str):
        from .preprocess import ImageDecodeError, load_ground_image, load_image

        try:
            return load_ground_image(path, self.config) if what == "ground" else load_image(path)
        except (ImageDecodeError, OSError, ValueError) as exc:
            raise DatasetError(f"pair {rec.id}: cannot load {what} image {path}: {exc}") from None

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        from .preprocess import aerial_tensor, to_normalized_tensor

        if not -len(self.records) <= i < len(self.records):
            raise IndexError(i)
        rec = self.records[i]
        g = to_normalized_tensor(self._load(rec.ground_path, rec, "ground"))
        aimg = self._load(rec.aerial_path, rec, "aerial")
        if rec.aerial_is_polar:
            h, w = self.config.aerial_size
            a = to_normalized_tensor(aimg if aimg.size == (w, h) else aimg.resize((w, h), Image.BILINEAR))
        else:
            a = aerial_tensor(aimg, self.config)
        return {"ground": g, "aerial": a, "index": i % len(self.records)}
