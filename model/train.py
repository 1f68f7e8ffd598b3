"""Train L2LTR on a cross-view data set (synthetic world directory, CVUSA or CVACT).

  python -m model.train --data data/train_world --config tiny --out runs/tiny --epochs 10

A run directory holds `train_state.pt` (everything needed to resume), `log.jsonl` (one JSON
object per logged step / evaluation), `best.safetensors` (best validation R@1) and
`last.safetensors`. Re-running the same command with `--resume` continues an interrupted run and
reaches the same weights as an uninterrupted one (same batches, same dropout masks).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .arguments import non_negative_int, number, output_dir, positive_int
from .atomic import atomic_write
from .augment import PairAugment
from .checkpoint import CheckpointError, load_checkpoint, load_npz_into, save_checkpoint
from .config import ConfigError, L2LTRConfig
from .encode import autocast_context, encode_batch, pick_device
from .losses import footprint_overlap, make_loss
from .metrics import retrieval_recall
from .network import L2LTR
from .plot import log_lines
from .preprocess import (ImageDecodeError, normalize_uint8_batch, normalize_unit_batch, polar_transform_torch,
                         unit_batch)

if TYPE_CHECKING:
    from .datasets import PairRecord

STATE_FILE = "train_state.pt"
STATE_KEYS = ("model", "loss", "optimizer", "step", "best_r1", "rng", "args")
LOG_FILE = "log.jsonl"


class TrainingError(RuntimeError):
    """Training cannot start or go on; the message says why and what to do."""


# --------------------------------------------------------------------------- data

@dataclass
class PairArrays:
    """Preprocessed pairs held in memory as uint8 model-size images (fast epochs on CPU)."""

    ground: np.ndarray  # [N, H, W, 3] uint8
    aerial: np.ndarray  # [N, H, W, 3] uint8
    latlon: np.ndarray | None  # [N, 2] float64 or None
    tile_latlon: np.ndarray | None = None  # [N, 2]: each tile's centre where the data set names it

    def __len__(self) -> int:
        return len(self.ground)


def load_pair_arrays(records: Sequence, config: L2LTRConfig, desc: str = "preprocess", workers: int = 0,
                     quiet: bool = False, tile_side: int | None = None) -> PairArrays:
    """Decode + preprocess every record once (ground resize; aerial polar + resize). With `tile_side`
    the aerial images are kept as north-up tiles of that side, for a polar transform per batch."""
    from tqdm import tqdm

    from .preprocess import aerial_image, load_ground_image, load_image

    n = len(records)
    ground = np.empty((n, *config.ground_size, 3), np.uint8)
    aerial = np.empty((n, *((tile_side, tile_side) if tile_side else config.aerial_size), 3), np.uint8)

    def aerial_array(r):
        if not tile_side:
            return np.asarray(aerial_image(load_image(r.aerial_path), config))
        return np.asarray(load_image(r.aerial_path).resize((tile_side, tile_side), Image.BILINEAR))

    def work(i):
        r = records[i]
        return i, np.asarray(load_ground_image(r.ground_path, config)), aerial_array(r)

    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            results = pool.map(work, range(n))
            for i, g, a in tqdm(results, total=n, desc=desc, unit="pair", dynamic_ncols=True, disable=quiet):
                ground[i], aerial[i] = g, a
    else:
        for i in tqdm(range(n), desc=desc, unit="pair", dynamic_ncols=True, disable=quiet):
            _, ground[i], aerial[i] = work(i)
    has_ll = all(getattr(r, "lat", None) is not None for r in records)
    latlon = np.array([(r.lat, r.lon) for r in records], np.float64) if has_ll and n else None
    has_tile = has_ll and all(getattr(r, "tile_lat", None) is not None for r in records)
    tile_latlon = np.array([(r.tile_lat, r.tile_lon) for r in records], np.float64) if has_tile and n else None
    return PairArrays(ground, aerial, latlon, tile_latlon)


MAX_CENTRE_JITTER = 0.4  # --centre-jitter's largest polar-centre move, a share of the tile's side


def check_off_centre_inputs(config: L2LTRConfig, records: Sequence) -> None:
    """--centre-jitter moves the polar transform's centre: it needs a polar config and the aerial tiles
    (not pre-computed polar images) of every record."""
    if not config.polar:
        raise TrainingError("--centre-jitter moves the polar transform's centre; the config has no polar transform")
    polar_record = next((r for r in records if r.aerial_is_polar), None)
    if polar_record:
        raise TrainingError(f"--centre-jitter needs the aerial tiles; {polar_record.aerial_path} is a polar image")


def jitter_tile_side(config: L2LTRConfig) -> int:
    """The side at which --centre-jitter keeps the tiles: four pixels per polar row (two of radius), the
    demo's 256-pixel tiles for its 64 rows."""
    return 4 * (config.polar_intermediate or config.aerial_size)[0]


def off_centre_polar(tiles: np.ndarray, config: L2LTRConfig, jitter: float,
                     generator: torch.Generator) -> torch.Tensor:
    """[B, S, S, 3] uint8 north-up tiles -> [B, 3, H, W] polar images in [0, 1], each centred a random
    distance (uniform over a disc of radius `jitter` x the tile's side) from its tile's centre: the
    aerial view of a camera standing that far from the centre, as on a grid of tiles."""
    b, side = tiles.shape[0], tiles.shape[1]
    radius = jitter * side * torch.rand(b, generator=generator).sqrt()
    angle = 2 * math.pi * torch.rand(b, generator=generator)
    shift = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    polar = polar_transform_torch(unit_batch(tiles), *(config.polar_intermediate or config.aerial_size), shift)
    if polar.shape[-2:] != tuple(config.aerial_size):
        polar = F.interpolate(polar, size=tuple(config.aerial_size), mode="bilinear", antialias=True)
    return polar.clamp_(0.0, 1.0)


def check_tile_centres(records: Sequence, tile_m: float, loss: str, root: Path) -> None:
    """--semi-positives needs every training pair's tile centre, within a tile of its camera."""
    if loss != "infonce":
        raise TrainingError(f"--semi-positives needs --loss infonce (the {loss} loss has no semi-positives)")
    for r in records:
        if r.lat is None or getattr(r, "tile_lat", None) is None:
            raise TrainingError(f"--semi-positives: pair {r.id} of {root} has no tile centre (the split files need "
                                "the columns tile_lat,tile_lon, as scripts/grid_pairs.py writes them)")
        camera, tile = np.array([[r.lat, r.lon]]), np.array([[r.tile_lat, r.tile_lon]])
        if footprint_overlap(camera, tile, tile_m)[0, 0] <= 0:
            raise TrainingError(f"--semi-positives {tile_m:g}: pair {r.id}'s tile does not cover its camera "
                                f"(a tile side of {tile_m:g} m; is that the tiles' size?)")


def read_records(dataset: str, root: Path, split: str):
    """Records of one split, with a clear error for a missing or empty data set."""
    from . import datasets

    if not root.exists():
        raise TrainingError(f"data directory {root} does not exist")
    if root.is_dir() and not any(root.iterdir()):
        raise TrainingError(f"data directory {root} is empty")
    try:
        records = datasets.load_split(dataset, root, split)
    except datasets.DatasetError as exc:
        raise TrainingError(str(exc)) from None
    if not records:
        raise TrainingError(f"{dataset} data in {root}: split {split!r} has no pairs")
    return records


# --------------------------------------------------------------------------- batching

def neighbour_batches(latlon: np.ndarray, batch_size: int, n_batches: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Up to `n_batches` batches, each a random anchor plus its nearest unused neighbours, so
    that a batch holds look-alike nearby locations (hard negatives, as Sample4Geo does)."""
    from scipy.spatial import cKDTree

    xy = np.column_stack([latlon[:, 0], latlon[:, 1] * np.cos(np.radians(latlon[:, 0].mean()))])
    tree = cKDTree(xy)
    n = len(xy)
    used = np.zeros(n, bool)
    batches = []
    for anchor in rng.permutation(n):
        if len(batches) == n_batches:
            break
        if used[anchor]:
            continue
        k = min(n, 4 * batch_size)
        while True:
            _, idx = tree.query(xy[anchor], k=k)
            free = idx[~used[idx]][:batch_size]
            if len(free) == batch_size or k == n:
                break
            k = min(n, 4 * k)
        if len(free) < batch_size:
            break
        used[free] = True
        batches.append(free)
    return batches


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, latlon: np.ndarray | None = None,
                  hard_fraction: float = 0.0) -> list[np.ndarray]:
    """The batches of one epoch, a pure function of (seed, epoch) so that resuming replays them.

    A `hard_fraction` of the batches is made of geographic neighbours; the rest are random."""
    if batch_size < 1:  # no batches at all: the training loop would wait for one forever
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rng = np.random.default_rng([seed, epoch])
    n_batches = n // batch_size
    if n_batches == 0:
        raise TrainingError(f"{n} training pairs are fewer than one batch of {batch_size}")
    perm = rng.permutation(n)
    n_hard = int(round(hard_fraction * n_batches)) if latlon is not None else 0
    batches = []
    if n_hard:
        batches += neighbour_batches(latlon, batch_size, n_hard, rng)
        used = np.zeros(n, bool)
        for b in batches:
            used[b] = True
        perm = perm[~used[perm]]
    batches += [perm[i * batch_size:(i + 1) * batch_size] for i in range(n_batches - len(batches))]
    return [batches[i] for i in rng.permutation(len(batches))]


def lr_at(step: int, total: int, base_lr: float, warmup: int) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# --------------------------------------------------------------------------- evaluation

def encode_arrays(model: L2LTR, arrays: PairArrays, device: torch.device, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Ground and aerial descriptors of cached pairs (eval mode for the call, then restored)."""
    was_training = model.training
    model.eval()
    out = []
    for branch, images in (("ground", arrays.ground), ("aerial", arrays.aerial)):
        parts = [encode_batch(model, normalize_uint8_batch(images[s:s + batch_size]), branch, device)
                 for s in range(0, len(images), batch_size)]
        out.append(torch.cat(parts).numpy())
    model.train(was_training)
    return out[0], out[1]


def evaluate_arrays(model: L2LTR, arrays: PairArrays, device: torch.device) -> dict[str, float]:
    g, a = encode_arrays(model, arrays, device)
    return retrieval_recall(g, a)


# --------------------------------------------------------------------------- state

def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_resume_state(path: Path) -> dict:
    """A run's saved training state, or a TrainingError that names the file and what to do."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many kinds for a truncated or foreign file
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise TrainingError(f"{path} is damaged and can not be resumed ({reason}); delete it to train this run "
                            "again from step 0, or train into a new --out") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise TrainingError(f"{path} is not a training state (no {', '.join(missing)}); delete it to train this "
                            "run again from step 0, or train into a new --out")
    return state


class JsonLog:
    def __init__(self, path: Path, truncate_after_step: int | None = None):
        self.path = path
        if truncate_after_step is not None and path.exists():
            # a resumed run rewrites what came after its checkpoint (and a line torn by a crash)
            try:
                lines = log_lines(path)
            except ValueError as exc:
                raise TrainingError(f"{exc}; repair or delete that line to resume") from None
            # and drops the "end" lines its stops wrote: the run ends once, when it ends
            keep = "".join(line + "\n" for line, record in lines
                           if record.get("step", 0) <= truncate_after_step and record.get("event") != "end")
            atomic_write(path, lambda tmp: Path(tmp).write_text(keep))

    def write(self, **record) -> None:
        record.setdefault("time", time.time())
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- training

RESUME_KEYS = ("data", "dataset", "attention", "no_polar", "batch_size", "lr", "weight_decay", "warmup",
               "clip", "loss", "hard_negatives", "seed", "epochs", "steps", "init", "augment", "precision", "dropout",
               "fov_augment", "semi_positives", "photo_share", "photo_fov", "photo_mask", "photo_tilt",
               "centre_jitter", "max_pairs", "max_eval_pairs", "eval_split")
RESUME_PATHS = ("data", "init")  # compared as the files they name: a relative path from elsewhere is the same run
ADDED_SETTING_DEFAULTS = {"augment": False, "precision": "auto", "dropout": None, "fov_augment": 0.0,
                          "semi_positives": 0.0, "photo_share": 0.5, "photo_fov": None, "photo_mask": "band",
                          "photo_tilt": 0.0, "centre_jitter": 0.0, "max_pairs": 0, "max_eval_pairs": 0,
                          "eval_split": "val"}


def added_setting(args, name: str):
    """A setting added after the first runs: its value, or its default for callers (and saved runs)
    that predate it."""
    return getattr(args, name, ADDED_SETTING_DEFAULTS[name])


def resume_differences(saved_args: dict, args) -> dict:
    """The RESUME_KEYS settings in which ``args`` differ from a saved run's: {name: (saved, now)}."""
    saved = {**ADDED_SETTING_DEFAULTS, **saved_args}  # a run saved before a setting existed used its default

    def same(key: str, a, b) -> bool:
        return a == b or (key in RESUME_PATHS and a is not None and b is not None
                          and os.path.realpath(a) == os.path.realpath(b))

    return {k: (saved.get(k), getattr(args, k)) for k in RESUME_KEYS if not same(k, saved.get(k), getattr(args, k))}


def config_differences(saved: dict | None, config: L2LTRConfig) -> dict:
    """The fields in which ``config`` differs from a saved run's (its --config file edited since, or
    another file or name for another network): {"config.field": (saved, now)}. A field added to
    L2LTRConfig after the run was saved has its default there."""
    if saved is None:
        return {}
    try:
        before = L2LTRConfig.from_dict(saved).to_dict()
    except ConfigError as exc:
        return {"config": (f"saved by another version of model.config ({str(exc).split(';')[0]})", config.name)}
    now = config.to_dict()
    return {f"config.{k}": (before[k], now[k]) for k in now if k != "name" and before[k] != now[k]}


def records_digest(root: Path, *splits: Sequence[PairRecord]) -> str:
    """What the pairs of a run are (ids, image paths under ``root``, positions, in order): a data set
    regenerated or edited at the same path gives another digest."""
    top = os.path.realpath(root)
    h = hashlib.sha256()
    for records in splits:
        h.update(json.dumps([[r.id, *(os.path.relpath(os.path.realpath(p), top) for p in (r.ground_path, r.aerial_path)),
                              r.lat, r.lon, r.tile_lat, r.tile_lon] for r in records]).encode())
    return h.hexdigest()


def build_config(args) -> L2LTRConfig:
    cfg = L2LTRConfig.resolve(args.config)
    changes = {}
    if args.attention:
        changes["attention"] = args.attention
    if args.dropout is not None:
        changes["dropout"] = args.dropout
    if args.no_polar:
        side = cfg.aerial_size[0] * 2
        changes.update(polar=False, polar_intermediate=None, aerial_size=(side, side))
    return cfg.replace(**changes) if changes else cfg


def training_autocast(device: torch.device, precision: str):
    """`auto`: bf16 on CUDA, float32 on CPU; `bf16` also on CPU (AVX-512 BF16 / AMX machines gain)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return autocast_context(device, enabled=precision == "auto")


def train(args) -> dict:
    out = Path(args.out)
    device = pick_device(args.device)
    config = build_config(args)
    centre_jitter = added_setting(args, "centre_jitter")
    state_path = out / STATE_FILE
    resume_state = None
    if args.resume and state_path.exists():
        resume_state = load_resume_state(state_path)
        diffs = resume_differences(resume_state["args"], args)
        diffs.update(config_differences(resume_state.get("config"), config))
        if diffs:
            raise TrainingError(f"--resume from {state_path} with different settings {diffs}; "
                                "use the original command or a new --out")
    elif state_path.exists() and not args.resume:
        raise TrainingError(f"{out} already holds a run ({STATE_FILE}); pass --resume to continue it or pick a new --out")
    log = JsonLog(out / LOG_FILE, truncate_after_step=resume_state["step"] if resume_state else None)

    train_records = read_records(args.dataset, Path(args.data), "train")
    val_records = read_records(args.dataset, Path(args.data), args.eval_split) if args.eval_every else []
    if args.max_pairs:
        train_records = train_records[: args.max_pairs]
    if args.max_eval_pairs:
        val_records = val_records[: args.max_eval_pairs]
    # the training pairs, always; the evaluation pairs where both the saved run and this one evaluate
    # (a state of the session that introduced them holds one "data_digest" of both: not compared)
    digests = {"train_digest": records_digest(Path(args.data), train_records),
               "eval_digest": records_digest(Path(args.data), val_records) if val_records else None}
    if resume_state and digests["eval_digest"] is None:  # a session without evaluation keeps the run's
        digests["eval_digest"] = resume_state.get("eval_digest")
    for key, what in (("train_digest", "training"), ("eval_digest", f"{args.eval_split}")):
        saved = resume_state.get(key) if resume_state else None
        if saved is not None and digests[key] is not None and saved != digests[key]:
            raise TrainingError(f"--resume from {state_path}: the {what} pairs under {args.data} are not the ones "
                                "this run used (regenerated or edited since); use the original data or a new --out")
    if len(train_records) < args.batch_size:
        raise TrainingError(f"{len(train_records)} training pairs are fewer than one batch of {args.batch_size}")
    if centre_jitter:
        check_off_centre_inputs(config, train_records)
    semi_positives = added_setting(args, "semi_positives")
    if semi_positives:
        check_tile_centres(train_records, semi_positives, args.loss, Path(args.data))
    torch.manual_seed(args.seed)
    model = L2LTR(config)
    if args.init and not resume_state:
        init = Path(args.init)
        if init.suffix == ".npz":
            load_npz_into(model, init)
        else:
            loaded = load_checkpoint(init)
            # dropout rates are training settings: fine-tuning may change them
            if loaded.config.replace(name=config.name, dropout=config.dropout,
                                     attention_dropout=config.attention_dropout) != config:
                raise TrainingError(f"--init {init} has config {loaded.config.to_json()}, which differs from "
                                    f"the training config {config.to_json()}")
            model.load_state_dict(loaded.state_dict())
    model.to(device).train()
    loss_fn = make_loss(args.loss).to(device)
    params = list(model.parameters()) + list(loss_fn.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)

    train_data = load_pair_arrays(train_records, config, "preprocess train", workers=args.workers, quiet=args.quiet,
                                  tile_side=jitter_tile_side(config) if centre_jitter else None)
    val_data = (load_pair_arrays(val_records, config, f"preprocess {args.eval_split}", workers=args.workers,
                                 quiet=args.quiet) if val_records else None)
    out.mkdir(parents=True, exist_ok=True)  # after the preprocessing, which a damaged image stops
    steps_per_epoch = len(train_data) // args.batch_size
    total_steps = args.steps or args.epochs * steps_per_epoch

    step, best_r1 = 0, -1.0
    if resume_state:
        model.load_state_dict(resume_state["model"])
        loss_fn.load_state_dict(resume_state["loss"])
        optimizer.load_state_dict(resume_state["optimizer"])
        step, best_r1 = resume_state["step"], resume_state["best_r1"]
        set_rng_state(resume_state["rng"])
        print(f"resumed {out} at step {step}/{total_steps}", file=sys.stderr)
    if not resume_state:
        (out / LOG_FILE).write_text("")
        log.write(step=0, event="start", config=config.to_dict(), args=vars(args), device=str(device),
                  train_pairs=len(train_data), eval_pairs=len(val_data) if val_data else 0, total_steps=total_steps)

    def save_state():
        state = {"model": model.state_dict(), "loss": loss_fn.state_dict(), "optimizer": optimizer.state_dict(),
                 "step": step, "best_r1": best_r1, "rng": rng_state(), "args": vars(args), "config": config.to_dict(),
                 **digests, "log_window": [window_loss, window_n], "minutes": minutes()}
        atomic_write(state_path, partial(torch.save, state))

    def provenance(extra=None):
        return {"trained_steps": step, "data": str(args.data), "dataset": args.dataset, "seed": args.seed,
                "loss": args.loss, "batch_size": args.batch_size,
                **({"semi_positives_m": semi_positives} if semi_positives else {}),
                **({"centre_jitter": centre_jitter} if centre_jitter else {}),
                **({"init": Path(args.init).name} if args.init else {}), **(extra or {})}

    fov_augment = added_setting(args, "fov_augment")
    photo_fov = added_setting(args, "photo_fov")
    photo = dict(photo=added_setting(args, "photo_share"), photo_fov_range=tuple(photo_fov) if photo_fov else None,
                 photo_mask=added_setting(args, "photo_mask"), photo_tilt=added_setting(args, "photo_tilt"))
    augment = (PairAugment(fov=fov_augment, **photo) if args.augment
               else PairAugment(turn=0.0, flip=0.0, color=0.0, fov=fov_augment, **photo) if fov_augment else None)

    from tqdm import tqdm

    started = time.time()
    earlier_minutes = resume_state.get("minutes", 0.0) if resume_state else 0.0

    def minutes() -> float:
        """The run's wall time, over every session of it (--max-minutes limits this one's)."""
        return earlier_minutes + (time.time() - started) / 60

    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True, disable=args.quiet)
    # a log line's loss averages the steps since the previous line, across a stop and resume too
    window_loss, window_n = resume_state.get("log_window", (0.0, 0)) if resume_state else (0.0, 0)
    window_t, timed_n = time.time(), 0  # the steps timed since window_t, for pairs/s
    stopped_early = False
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        batches = epoch_batches(len(train_data), args.batch_size, args.seed, epoch, train_data.latlon, args.hard_negatives)
        for idx in batches[offset:]:
            if step >= total_steps:
                break
            idx = np.sort(idx)
            batch_rng = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
            g = unit_batch(train_data.ground[idx])
            a = (off_centre_polar(train_data.aerial[idx], config, centre_jitter, batch_rng) if centre_jitter
                 else unit_batch(train_data.aerial[idx]))
            if augment:
                g, a = augment(g, a, config.polar, batch_rng)
            g = normalize_unit_batch(g).to(device, non_blocking=True)
            a = normalize_unit_batch(a).to(device, non_blocking=True)
            lr = lr_at(step, total_steps, args.lr, args.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            overlap = None
            if semi_positives:
                overlap = torch.from_numpy(footprint_overlap(train_data.latlon[idx], train_data.tile_latlon[idx],
                                                             semi_positives)).float().to(device)
            with training_autocast(device, args.precision):
                gd, ad = model(g, a)
                loss = loss_fn(gd.float(), ad.float(), overlap)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss is {loss.item()} at step {step} (lr {lr:.3g}); stopped instead of training "
                                    f"through it. Last good state: {state_path if state_path.exists() else 'none saved'}. "
                                    "Try a lower --lr or check the data.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(params, args.clip)
            optimizer.step()
            step += 1
            window_loss += loss.item()
            window_n += 1
            timed_n += 1
            bar.update(1)
            if step % args.log_every == 0 or step == total_steps:
                dt = time.time() - window_t
                rate = timed_n * args.batch_size / max(dt, 1e-9)
                bar.set_postfix(loss=f"{window_loss / window_n:.4f}", pairs_s=f"{rate:.1f}", lr=f"{lr:.2e}")
                log.write(step=step, event="train", loss=window_loss / window_n, lr=lr, grad_norm=float(grad_norm),
                          pairs_per_s=rate, epoch=epoch)
                window_loss, window_n, window_t, timed_n = 0.0, 0, time.time(), 0
            do_eval = val_data is not None and (step % args.eval_every == 0 or step == total_steps)
            if do_eval:
                try:
                    rec = evaluate_arrays(model, val_data, device)
                except ValueError as exc:  # e.g. NaN descriptors
                    raise TrainingError(f"evaluation at step {step} failed: {exc}") from None
                log.write(step=step, event="eval", split=args.eval_split, n=len(val_data), **rec)
                bar.write(f"step {step}: {args.eval_split} R@1 {rec['r1']:.3f} R@5 {rec['r5']:.3f} "
                          f"R@10 {rec['r10']:.3f} R@1% {rec['r1pct']:.3f}", file=sys.stderr)
                if rec["r1"] > best_r1:
                    best_r1 = rec["r1"]
                    save_checkpoint(model, out / "best.safetensors", dtype=torch.float16,
                                    metadata=provenance({"val": rec}))
            if step % args.save_every == 0 or step == total_steps:
                save_state()
            if args.max_minutes and (time.time() - started) / 60 > args.max_minutes:  # this session's
                stopped_early = True
                save_state()
                bar.write(f"time budget of {args.max_minutes} min reached at step {step}; resume with --resume",
                          file=sys.stderr)
                break
        if stopped_early:
            break
    bar.close()
    save_state()
    save_checkpoint(model, out / "last.safetensors", dtype=torch.float16, metadata=provenance())
    summary = {"step": step, "total_steps": total_steps, "best_r1": best_r1, "minutes": minutes(),
               "finished": step >= total_steps}
    log.write(event="end", **summary)
    return summary


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and each option's default after its help text, where it has
    one to show (not for flags, nor for options whose absence means "not given")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.default is None or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def training_batch_size(text: str) -> int:
    """argparse type of --batch-size: at least 2, as each pair's negatives are the batch's other pairs."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (each pair's negatives are the batch's other pairs), "
                                         f"got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.train", description=__doc__, formatter_class=HelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, help="data set root directory")
    d.add_argument("--dataset", default="synthetic", choices=["synthetic", "cvusa", "cvact"], help="layout of --data")
    d.add_argument("--eval-split", default="val", help="split evaluated periodically")
    d.add_argument("--max-pairs", type=non_negative_int, default=0,
                   help="use at most this many training pairs (0: all)")
    d.add_argument("--max-eval-pairs", type=non_negative_int, default=0,
                   help="evaluate on at most this many pairs (0: all)")
    d.add_argument("--workers", type=non_negative_int, default=2, help="threads decoding images during preprocessing")
    m = p.add_argument_group("model")
    m.add_argument("--config", default="tiny", help="config name (paper, small, tiny), JSON or JSON file")
    m.add_argument("--attention", choices=["self_cross", "vanilla"], help="override the config's attention mode")
    m.add_argument("--no-polar", action="store_true", help="feed the aerial branch the plain tile (ablation)")
    m.add_argument("--dropout", type=number(0, below=1), help="override the config's dropout rate (0..1)")
    m.add_argument("--init", help="initial weights: Google .npz or one of our .safetensors")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=positive_int, default=10, help="passes over the training pairs")
    o.add_argument("--steps", type=non_negative_int, default=0,
                   help="total steps (0: --epochs x training pairs / --batch-size)")
    o.add_argument("--batch-size", type=training_batch_size, default=32,
                   help="pairs per step; the other pairs of the batch are each pair's negatives")
    o.add_argument("--lr", type=number(above=0), default=1e-4, help="peak AdamW learning rate, reached after --warmup")
    o.add_argument("--weight-decay", type=number(0), default=0.03, help="AdamW weight decay")
    o.add_argument("--warmup", type=non_negative_int, default=500, help="linear warm-up steps before the cosine decay")
    o.add_argument("--clip", type=number(above=0), default=1.0, help="gradient norm clip")
    o.add_argument("--loss", choices=["triplet", "infonce"], default="triplet",
                   help="triplet: the paper's weighted soft-margin triplet loss over all in-batch negatives; "
                        "infonce: symmetric InfoNCE with a learned temperature")
    o.add_argument("--hard-negatives", type=number(0, 1), default=0.0,
                   help="fraction of batches made of geographic neighbours (0..1)")
    o.add_argument("--semi-positives", type=number(0), default=0.0, metavar="TILE_M",
                   help="cameras anywhere in a grid of overlapping tiles (VIGOR-style; needs tile_lat,tile_lon in the "
                        "split files and --loss infonce): each batch's tiles count as positives in proportion to how "
                        "much of a TILE_M-metre square centred on the camera they cover, so an overlapping "
                        "neighbour is a semi-positive, not a negative (0: off; use with --hard-negatives)")
    o.add_argument("--centre-jitter", type=number(0, MAX_CENTRE_JITTER), default=0.0, metavar="F",
                   help="move each training tile's polar centre a random distance (uniform over a disc of radius F "
                        "x the tile's side) from the camera, for cameras anywhere in a grid of tiles (0: off)")
    o.add_argument("--augment", action="store_true",
                   help="aligned random turn + east-west mirror of both views, independent colour jitter")
    o.add_argument("--fov-augment", type=number(0, 1), default=0.0, metavar="P",
                   help="probability of cutting a panorama to a random field of view (60-240 degrees, anywhere "
                        "around the camera; half of them also to a 4:3 photo's height), for limited-view queries")
    o.add_argument("--photo-share", type=number(0, 1), default=0.5, metavar="S",
                   help="with --fov-augment: share of the cut panoramas that are a level 4:3 phone photo's frame")
    o.add_argument("--photo-fov", type=number(above=0, high=360), nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="with --fov-augment: a photo frame's horizontal field of view, degrees (default: the "
                        "crops' 60-240, a frame of 170 or more cut as a crop)")
    o.add_argument("--photo-mask", choices=["band", "pinhole"], default="band",
                   help="band: a photo frame keeps the rows of its vertical field of view; pinhole: its true "
                        "outline in the panorama frame, as model.views.place_view masks a photo")
    o.add_argument("--photo-tilt", type=number(0, 30), default=0.0, metavar="DEG",
                   help="with --fov-augment: a photo's camera pitched and rolled, each uniform in +-DEG, and the "
                        "photo placed as if level (as a photo whose tilt is neither sent nor estimated); 0: level photos")
    o.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on CUDA, float32 on CPU; bf16 forces autocast on CPU too")
    o.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the initial weights, batch order and augmentation")
    r = p.add_argument_group("run")
    r.add_argument("--out", required=True, type=output_dir, help="run directory (state, logs, checkpoints)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last saved state")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (bf16 autocast on CUDA)")
    r.add_argument("--eval-every", type=non_negative_int, default=500, help="steps between evaluations (0: never)")
    r.add_argument("--save-every", type=positive_int, default=100, help="steps between resumable state saves")
    r.add_argument("--log-every", type=positive_int, default=10, help="steps between lines of log.jsonl")
    r.add_argument("--max-minutes", type=number(0), default=0,
                   help="stop (resumably) after this many minutes of wall time (0: no limit)")
    r.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads (0: torch default)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.photo_fov and args.photo_fov[0] > args.photo_fov[1]:
        parser.error(f"argument --photo-fov: MIN {args.photo_fov[0]:g} is above MAX {args.photo_fov[1]:g}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        summary = train(args)
    except (TrainingError, CheckpointError, ConfigError, ImageDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command with --resume to continue from the last saved state",
              file=sys.stderr)
        return 130
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
