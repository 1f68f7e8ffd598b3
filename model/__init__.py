"""L2LTR: the two-branch Layer-to-Layer Transformer for cross-view geo-localization."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ConfigError, L2LTRConfig
from .network import L2LTR

__all__ = ["L2LTR", "L2LTRConfig", "load_checkpoint", "save_checkpoint", "CheckpointError", "ConfigError"]
