"""L2LTR at inference time: the boundary between the network (a plain ``nn.Module``) and the
programs that serve it (the service, index_build, benchmarks).

``InferenceEncoder`` owns everything inference adds to the network: eval mode on a device,
frozen TorchScript traces of the branches (CPU), channels_last and bf16 autocast (CUDA), the
uint8 batch path, and unit-length float32 rows out. The traces are built in the constructor, so
the first request pays nothing for them.

The CPU forward also gains from two glibc allocator settings, which only the environment of a new
process can carry (``model.allocator``; the entry points ``python -m service`` and
``python -m index_build`` re-execute themselves once with them, before torch is imported).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .encode import BRANCHES, autocast_context
from .network import L2LTR
from .preprocess import normalize_uint8_nchw

def _trace(branch: torch.nn.Module, example: torch.Tensor):
    """A frozen TorchScript trace of ``branch`` (any batch size), or the branch itself where this
    torch cannot trace it: TorchScript is deprecated upstream, torch is pinned, and a later torch
    that drops it costs speed, not correctness."""
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            # the input size is fixed per branch: its shape checks become constants of the trace
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.freeze(torch.jit.trace(branch, example, check_trace=False))
    except Exception as exc:  # noqa: BLE001 - any failure leaves the eager module in charge
        warnings.warn(f"L2LTR: running the eager branch, tracing failed: {exc}", RuntimeWarning)
        return branch


class InferenceEncoder:
    """An L2LTR ready to encode batches of one or both branches.

    On a CPU each branch's transformer runs as a frozen TorchScript trace: it skips the per-operator
    Python work and runs without the interpreter lock, so several encoder threads in one process do
    not queue for it. A trace holds its own copy of the weights, taken here: the network must not
    change afterwards. On CUDA the network runs eagerly in channels_last with bf16 autocast. Where
    the network has an orientation head (model.orientation), `encode_uint8_with_columns` also gives
    each image's column features, the aerial ones at ``tile_phases`` sub-column phases."""

    def __init__(self, net: L2LTR, device: torch.device | str = "cpu", *,
                 branches: tuple[str, ...] = BRANCHES, trace: bool | None = None,
                 warm_up: int = 2, tile_phases: int = 1) -> None:
        if tile_phases < 1:
            raise ValueError(f"tile_phases must be at least 1, got {tile_phases}")
        self.tile_phases = int(tile_phases)
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.config = net.config
        self.orientation = getattr(self.net, "orientation", None)
        on_cuda = self.device.type == "cuda"
        if on_cuda:
            self.net = self.net.to(memory_format=torch.channels_last)
        trace = not on_cuda if trace is None else trace
        self._tokens = {}  # branch -> the transformer (or its trace): image -> final-layer tokens
        for name in branches:
            module = getattr(self.net, name).transformer
            self._tokens[name] = _trace(module, self._blank(name, 1).float()) if trace else module
        self.traced = tuple(name for name, fn in self._tokens.items() if isinstance(fn, torch.jit.ScriptModule))
        for name in branches:  # TorchScript optimises a trace over its first runs
            for _ in range(warm_up):
                self.encode(self._blank(name, 1).float(), name)

    @property
    def embedding_dim(self) -> int:
        return self.net.embedding_dim

    @property
    def column_shape(self) -> tuple[int, int] | None:
        """(columns, dim) of the aerial column features this encoder gives (an index artifact stores them):
        the config's `column_shape` with the columns of every tile phase side by side; None without a head."""
        shape = self.config.column_shape()
        return None if shape is None else (self.tile_phases * shape[0], shape[1])

    def input_size(self, branch: str) -> tuple[int, int]:
        return self.config.ground_size if branch == "ground" else self.config.aerial_size

    def _blank(self, branch: str, n: int) -> torch.Tensor:
        return torch.zeros(n, 3, *self.input_size(branch), dtype=torch.uint8, device=self.device)

    def _forward(self, batch: torch.Tensor, branch: str, columns: bool,
                 photos: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if branch not in self._tokens:
            raise ValueError(f"branch must be one of {tuple(self._tokens)}, got {branch!r}")
        self.net.check_input(batch, branch)
        tokens_of = self._tokens[branch]
        with torch.inference_mode(), autocast_context(self.device):
            x = batch.to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            tokens = tokens_of(x)
            out = F.normalize(tokens[:, 0].float(), dim=-1)
            if self.config.test_time_flip:  # and the view's east-west mirror (network.describe)
                out = out + F.normalize(tokens_of(x.flip(3))[:, 0].float(), dim=-1)
            cols = None
            if columns and self.orientation is not None:
                cols = self.orientation.columns(tokens.float(), self.config.grid(branch), branch, photos).cpu()
        # bf16 rounding leaves rows slightly off unit length; renormalise in float32.
        return F.normalize(out.float(), dim=-1).cpu(), cols

    def encode(self, batch: torch.Tensor, branch: str) -> torch.Tensor:
        """ImageNet-normalised float images [n, 3, H, W] -> float32 unit rows [n, D] on the CPU."""
        return self._forward(batch, branch, columns=False)[0]

    def encode_uint8(self, images: torch.Tensor, branch: str, max_batch: int | None = None) -> np.ndarray:
        """uint8 images [n, 3, H, W] at the branch's input size -> float32 unit rows [n, D], at most
        ``max_batch`` per forward; each forward's images are normalised at once."""
        return self.encode_uint8_with_columns(images, branch, max_batch, columns=False)[0]

    def encode_uint8_with_columns(self, images: torch.Tensor, branch: str, max_batch: int | None = None,
                                  columns: bool = True, phases: int | None = None,
                                  photos: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """As `encode_uint8`, plus the orientation head's column features [n, Wg, C] (None where the
        network has no head); with ``phases`` > 1 (default: ``tile_phases`` for the aerial branch, else 1),
        at that many sub-column phases, [n, phases * Wg, C], phase by phase (model.orientation.phase_columns:
        each phase is one more forward of the images), as an index stores a tile's. A ground view's are
        [n, phases, Wg, C] (model.orientation.view_phase_scores) and its descriptor the mean over its phases
        (unit length again); a tile's stays its phase 0 one. ``photos`` [n] (bool): the ground views that are
        phone photos, whose columns go through the head's photo map where it has one (`OrientationHead.columns`)."""
        phases = (self.tile_phases if branch == "aerial" else 1) if phases is None else phases
        if phases > 1 and columns:
            from .orientation import phase_columns

            rows, cols = self.encode_uint8_with_columns(images, branch, max_batch, phases=1, photos=photos)
            if cols is None:
                return rows, None
            turned_rows = []  # each phase's descriptors (a view's are averaged)

            def encode_columns(turned: torch.Tensor) -> np.ndarray:
                phase_rows, phase_cols = self.encode_uint8_with_columns(turned, branch, max_batch, phases=1,
                                                                        photos=photos)
                turned_rows.append(phase_rows)
                return phase_cols

            phased = phase_columns(encode_columns, images, phases, first=cols)
            if branch == "ground":
                rows = F.normalize(torch.from_numpy(np.mean([rows, *turned_rows], axis=0)), dim=-1).numpy()
                return rows, phased
            return rows, np.ascontiguousarray(phased.reshape(len(cols), -1, cols.shape[-1]))
        n = int(images.shape[0])
        step = max_batch or n or 1
        if photos is not None and len(photos) != n:
            raise ValueError(f"photos flags {len(photos)} views of {n}")
        parts = [self._forward(normalize_uint8_nchw(images[i:i + step]), branch, columns,
                               None if photos is None else photos[i:i + step]) for i in range(0, n, step)]
        if not parts:
            return np.zeros((0, self.embedding_dim), dtype=np.float32), None
        rows = np.ascontiguousarray(torch.cat([p[0] for p in parts]).numpy(), dtype=np.float32)
        cols = None if parts[0][1] is None else np.ascontiguousarray(torch.cat([p[1] for p in parts]).numpy())
        return rows, cols
