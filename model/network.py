"""The L2LTR network: a ResNetV2 hybrid stem + a ViT encoder with self-cross attention.

Module and parameter names follow the authors' checkpoint layout exactly
(`transformer.embeddings.hybrid_model.body.block1.unit1.conv1.weight`, ...), so their released
weights load unchanged into each branch.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .config import L2LTRConfig

GN_EPS = 1e-6
LN_EPS = 1e-6
WS_EPS = 1e-5


class StdConv2d(nn.Conv2d):
    """Conv2d with weight standardisation (zero mean, unit variance per output filter)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cached: tuple[tuple, torch.Tensor] | None = None

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        # In inference the standardised weight never changes; cache it keyed on the tensor version.
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if not (self.training or torch.is_grad_enabled()) and self._cached and self._cached[0] == key:
            return self._cached[1]
        var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
        ws = (w - mean) / torch.sqrt(var + WS_EPS)
        if not (self.training or torch.is_grad_enabled()):
            self._cached = (key, ws)
        return ws

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


def conv1x1(cin: int, cout: int, stride: int = 1) -> StdConv2d:
    return StdConv2d(cin, cout, kernel_size=1, stride=stride, padding=0, bias=False)


def conv3x3(cin: int, cout: int, stride: int = 1) -> StdConv2d:
    return StdConv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class Bottleneck(nn.Module):
    """ResNetV2 bottleneck unit as in the hybrid ViT: conv-GN-ReLU x2, conv-GN, residual, ReLU."""

    def __init__(self, cin: int, cout: int, cmid: int, stride: int = 1):
        super().__init__()
        self.gn1 = nn.GroupNorm(32, cmid, eps=GN_EPS)
        self.conv1 = conv1x1(cin, cmid)
        self.gn2 = nn.GroupNorm(32, cmid, eps=GN_EPS)
        self.conv2 = conv3x3(cmid, cmid, stride)
        self.gn3 = nn.GroupNorm(32, cout, eps=GN_EPS)
        self.conv3 = conv1x1(cmid, cout)
        if stride != 1 or cin != cout:
            self.downsample = conv1x1(cin, cout, stride)
            self.gn_proj = nn.GroupNorm(cout, cout)
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.gn_proj(self.downsample(x))
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return F.relu(residual + y)


class ResNetV2(nn.Module):
    """Hybrid stem: root (7x7/2 conv, GN, ReLU, 3x3/2 max-pool) and three blocks; output stride 16."""

    def __init__(self, units: tuple[int, int, int], width_factor: float):
        super().__init__()
        width = int(64 * width_factor)
        self.width = width
        self.root = nn.Sequential(OrderedDict([
            ("conv", StdConv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)),
            ("gn", nn.GroupNorm(32, width, eps=GN_EPS)),
            ("relu", nn.ReLU(inplace=True)),
            ("pool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        stages = []
        cin = width
        for b, (n_units, mult, stride) in enumerate(zip(units, (1, 2, 4), (1, 2, 2)), start=1):
            cmid, cout = width * mult, width * mult * 4
            block = OrderedDict()
            for u in range(1, n_units + 1):
                block[f"unit{u}"] = Bottleneck(cin, cout, cmid, stride if u == 1 else 1)
                cin = cout
            stages.append((f"block{b}", nn.Sequential(block)))
        self.body = nn.Sequential(OrderedDict(stages))
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.root(x))


class Embeddings(nn.Module):
    """Stem features -> 1x1 patch embedding -> [class token; patches] + position embeddings."""

    def __init__(self, config: L2LTRConfig, grid: tuple[int, int]):
        super().__init__()
        self.grid = grid
        self.hybrid_model = ResNetV2(config.resnet_units, config.resnet_width_factor)
        self.patch_embeddings = nn.Conv2d(self.hybrid_model.out_channels, config.hidden_size, kernel_size=1)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + grid[0] * grid[1], config.hidden_size))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embeddings(self.hybrid_model(x))
        if x.shape[-2:] != self.grid:
            raise ValueError(f"input gives a {tuple(x.shape[-2:])} patch grid, the model expects {self.grid}")
        x = x.flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return self.dropout(torch.cat([cls, x], dim=1) + self.position_embeddings)


class Attention(nn.Module):
    """Multi-head attention whose keys may come from a different sequence than queries and values."""

    def __init__(self, config: L2LTRConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = d // config.num_heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.attn_dropout_p = config.attention_dropout
        self.proj_dropout = nn.Dropout(config.attention_dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, key_source: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(key_source)), self._heads(self.value(x))
        ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout_p if self.training else 0.0)
        ctx = ctx.transpose(1, 2).reshape(x.shape)
        return self.proj_dropout(self.out(ctx))


class Mlp(nn.Module):
    def __init__(self, config: L2LTRConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.mlp_dim)
        self.fc2 = nn.Linear(config.mlp_dim, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer layer. Self-cross mode: queries/values from this layer's input
    (LayerNorm #1), keys from the previous layer's input (LayerNorm #2)."""

    def __init__(self, config: L2LTRConfig):
        super().__init__()
        d = config.hidden_size
        self.self_cross = config.attention == "self_cross"
        self.attention_norm_1 = nn.LayerNorm(d, eps=LN_EPS)
        self.attention_norm_2 = nn.LayerNorm(d, eps=LN_EPS)
        self.ffn_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.ffn = Mlp(config)
        self.attn = Attention(config)

    def forward(self, x: torch.Tensor, previous_input: torch.Tensor) -> torch.Tensor:
        h = self.attention_norm_1(x)
        keys = self.attention_norm_2(previous_input) if self.self_cross else h
        x = x + self.attn(h, keys)
        return x + self.ffn(self.ffn_norm(x))


class Encoder(nn.Module):
    def __init__(self, config: L2LTRConfig):
        super().__init__()
        self.layer = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.encoder_norm = nn.LayerNorm(config.hidden_size, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        previous_input = x  # layer 0 takes its keys from its own input
        for layer in self.layer:
            x, previous_input = layer(x, previous_input), x
        return self.encoder_norm(x)


class Transformer(nn.Module):
    def __init__(self, config: L2LTRConfig, grid: tuple[int, int]):
        super().__init__()
        self.embeddings = Embeddings(config, grid)
        self.encoder = Encoder(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embeddings(x))


class Branch(nn.Module):
    """One view's encoder: image [B,3,H,W] -> L2-normalised class token [B, hidden]."""

    def __init__(self, config: L2LTRConfig, grid: tuple[int, int]):
        super().__init__()
        self.transformer = Transformer(config, grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.transformer(x)[:, 0], dim=-1)


class L2LTR(nn.Module):
    """Two-branch L2LTR with separate weights for ground panoramas and (polar) aerial tiles."""

    def __init__(self, config: L2LTRConfig):
        super().__init__()
        self.config = config
        self.ground = Branch(config, config.grid("ground"))
        self.aerial = Branch(config, config.grid("aerial"))
        self.reset_parameters()
        if config.orientation_dim:  # after reset_parameters: the head has its own initialisation
            from .orientation import OrientationHead

            self.orientation = OrientationHead.for_config(config)

    @property
    def embedding_dim(self) -> int:
        return self.config.hidden_size

    def reset_parameters(self) -> None:
        """ViT-style init: truncated-normal linears and embeddings, Kaiming convs, unit norms."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for branch in (self.ground, self.aerial):
            emb = branch.transformer.embeddings
            nn.init.trunc_normal_(emb.position_embeddings, std=0.02)
            nn.init.trunc_normal_(emb.cls_token, std=0.02)

    def check_input(self, x: torch.Tensor, branch: str) -> None:
        expected = self.config.ground_size if branch == "ground" else self.config.aerial_size
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != expected:
            raise ValueError(f"{branch} input must be [B, 3, {expected[0]}, {expected[1]}], got {list(x.shape)}")

    def encode_ground(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x, "ground")
        return self._describe("ground", x)

    def encode_aerial(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x, "aerial")
        return self._describe("aerial", x)

    def _describe(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return describe(getattr(self, name), x, self.config.test_time_flip and not self.training)

    def forward(self, ground: torch.Tensor, aerial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_ground(ground), self.encode_aerial(aerial)

    def fingerprint(self) -> str:
        return state_fingerprint(self.config, self.state_dict())

    def num_parameters(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"ground": count(self.ground), "aerial": count(self.aerial), "total": count(self)}


def describe(branch, x: torch.Tensor, test_time_flip: bool = False) -> torch.Tensor:
    """A branch's descriptors of ``x``; with test-time flip, of ``x`` and its mirror image summed.
    ``branch`` is the module or a trace of it (model.inference)."""
    if not test_time_flip:
        return branch(x)
    # Width is azimuth for panoramas and polar tiles and east-west for plain tiles: flipping
    # it mirrors either view about the north-south axis through the camera.
    both = branch(torch.cat([x, x.flip(3)]))
    return F.normalize(both[: len(x)] + both[len(x):], dim=-1)


# Config fields added after fingerprints were published: at their default they leave the hash as it was.
FINGERPRINT_NEUTRAL_DEFAULTS = {"test_time_flip": False, "orientation_dim": 0, "orientation_rows": False,
                                "orientation_hidden": 0, "orientation_photo": False}


def state_fingerprint(config: L2LTRConfig, state: dict[str, torch.Tensor]) -> str:
    """16 hex chars of sha256 over the architecture and the float32 weights, key by key.

    Dtype-independent for weights stored in fp16/bf16 and loaded as float32, so a checkpoint and
    the model loaded from it agree. The config's `name` does not take part.
    """
    arch = config.to_dict()
    arch.pop("name", None)
    for key, default in FINGERPRINT_NEUTRAL_DEFAULTS.items():
        if arch.get(key) == default:
            arch.pop(key)
    h = hashlib.sha256(repr(sorted(arch.items())).encode())
    for key in sorted(state):
        t = state[key].detach().to("cpu", torch.float32).contiguous()
        h.update(key.encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]
