"""L2LTR: the two-branch Layer-to-Layer Transformer for cross-view geo-localization.

The names below load on first use, so a light submodule (``model.allocator``, ``model.config``) can
be imported without torch."""
from __future__ import annotations

import importlib

_EXPORTS = {"L2LTR": ".network", "L2LTRConfig": ".config", "ConfigError": ".config", "load_checkpoint": ".checkpoint",
            "save_checkpoint": ".checkpoint", "CheckpointError": ".checkpoint"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
