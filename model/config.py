"""L2LTRConfig: the one object that describes an L2LTR network and its input preprocessing."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

ATTENTION_MODES = ("self_cross", "vanilla")


class ConfigError(ValueError):
    """A configuration is malformed or does not match a checkpoint."""


def _pair(value: Any, name: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a pair (H, W) of integers, got {value!r}") from None
    if h <= 0 or w <= 0:
        raise ConfigError(f"{name} must be positive, got {value!r}")
    return h, w


@dataclass(frozen=True)
class L2LTRConfig:
    """Architecture of both branches plus the input sizes each branch expects.

    Sizes are (H, W). The hybrid stem has output stride 16, so each input side must be a
    multiple of 16; the number of position embeddings is 1 + (H/16) * (W/16).
    """

    hidden_size: int = 768
    num_heads: int = 12
    mlp_dim: int = 3072
    num_layers: int = 12
    resnet_units: tuple[int, int, int] = (3, 4, 9)
    resnet_width_factor: float = 1.0
    ground_size: tuple[int, int] = (128, 512)
    aerial_size: tuple[int, int] = (128, 512)
    attention: str = "self_cross"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    # Preprocessing of the aerial branch: polar-transform the north-up tile first (SAFA).
    polar: bool = True
    # Two-step polar path of the authors' pipeline: polar image at this size, then resize.
    polar_intermediate: tuple[int, int] | None = None
    # Inference only: a descriptor is the normalised mean of the view's and its east-west mirror's
    # (both views are mirrored the same way, so a pair stays a pair); twice the encoding cost.
    test_time_flip: bool = False
    # Width of the orientation head's column features (model.orientation); 0: no head.
    orientation_dim: int = 0
    # The head reads each token column row by row (the rows' tokens side by side) instead of their mean.
    orientation_rows: bool = False
    # Width of the head's hidden layer (GELU); 0: one linear map per branch.
    orientation_hidden: int = 0
    # The head has a second ground map, for phone photos (their outline in the panorama frame), trained on
    # them alone (model.orientation --photo-map); other views keep the ground map.
    orientation_photo: bool = False
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("ground_size", _pair(self.ground_size, "ground_size"))
        set_("aerial_size", _pair(self.aerial_size, "aerial_size"))
        set_("resnet_units", tuple(int(u) for u in self.resnet_units))
        if self.polar_intermediate is not None:
            set_("polar_intermediate", _pair(self.polar_intermediate, "polar_intermediate"))
        if len(self.resnet_units) != 3 or min(self.resnet_units) < 1:
            raise ConfigError(f"resnet_units must be three positive counts, got {self.resnet_units}")
        if self.attention not in ATTENTION_MODES:
            raise ConfigError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.stem_width < 32 or self.stem_width % 32:
            raise ConfigError(
                f"resnet_width_factor {self.resnet_width_factor} gives stem width {self.stem_width}; "
                "GroupNorm(32) needs a multiple of 32")
        for name in ("orientation_dim", "orientation_hidden"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("ground_size", "aerial_size"):
            h, w = getattr(self, name)
            if h % 16 or w % 16:
                raise ConfigError(f"{name} {(h, w)} must be multiples of 16 (stem output stride)")

    @property
    def stem_width(self) -> int:
        return int(64 * self.resnet_width_factor)

    def grid(self, branch: str) -> tuple[int, int]:
        h, w = self.ground_size if branch == "ground" else self.aerial_size
        return h // 16, w // 16

    def column_shape(self) -> tuple[int, int] | None:
        """(columns Wg, feature dim C) of the aerial column features a model with this config gives
        (`InferenceEncoder.encode_uint8_with_columns`; an index artifact stores them), or None when it
        has no orientation head."""
        if not self.orientation_dim:
            return None
        return self.grid("aerial")[1], int(self.orientation_dim)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "L2LTRConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**dict(data))

    @classmethod
    def from_json(cls, text: str) -> "L2LTRConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError("config JSON must be an object")
        return cls.from_dict(data)

    @classmethod
    def named(cls, name: str) -> "L2LTRConfig":
        try:
            return NAMED_CONFIGS[name]
        except KeyError:
            raise ConfigError(f"unknown config name {name!r}; choose one of {sorted(NAMED_CONFIGS)}") from None

    @classmethod
    def resolve(cls, spec: "str | Mapping[str, Any] | L2LTRConfig") -> "L2LTRConfig":
        """A config from a name, a JSON string, a path to a JSON file, a dict or a config."""
        if isinstance(spec, L2LTRConfig):
            return spec
        if isinstance(spec, Mapping):
            return cls.from_dict(spec)
        text = str(spec).strip()
        if text in NAMED_CONFIGS:
            return NAMED_CONFIGS[text]
        if text.startswith("{"):
            return cls.from_json(text)
        from pathlib import Path

        path = Path(text)
        if path.is_file():
            return cls.from_json(path.read_text())
        raise ConfigError(f"config {text!r} is neither a name {sorted(NAMED_CONFIGS)}, JSON, nor a JSON file")

    def replace(self, **changes: Any) -> "L2LTRConfig":
        return dataclasses.replace(self, **changes)


NAMED_CONFIGS: dict[str, L2LTRConfig] = {
    # R50-ViT-B/16 as published; polar aerial made at 112x616 then resized to 128x512.
    "paper": L2LTRConfig(name="paper", polar_intermediate=(112, 616)),
    # A GPU demo size: ViT-S-like trunk on a half-width R26 stem, paper input sizes.
    "small": L2LTRConfig(
        name="small", hidden_size=384, num_heads=6, mlp_dim=1536, num_layers=8,
        resnet_units=(2, 2, 2), resnet_width_factor=0.5, polar_intermediate=(112, 616)),
    # Trains on a 2-core CPU in under an hour: about 3.3 M parameters per branch.
    "tiny": L2LTRConfig(
        name="tiny", hidden_size=192, num_heads=3, mlp_dim=768, num_layers=6,
        resnet_units=(1, 1, 1), resnet_width_factor=0.5, ground_size=(64, 256), aerial_size=(64, 256)),
}
