"""Print a checkpoint's config, parameter counts and fingerprint.

  python -m model.info weights/l2ltr_tiny_demo.safetensors
  python -m model.info model_checkpoint.pth --config paper
  python -m model.info weights/l2ltr_tiny_demo.safetensors --save-config data/shipped_config.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .atomic import atomic_write
from .checkpoint import CheckpointError, check_checkpoint_file, load_checkpoint
from .config import ConfigError


def describe(path: Path, config=None) -> dict:
    model = load_checkpoint(path, config=config)
    return {
        "file": str(path),
        "config": model.config.to_dict(),
        "parameters": model.num_parameters(),
        "embedding_dim": model.embedding_dim,
        "fingerprint": model.fingerprint(),
        "provenance": getattr(model, "provenance", {}),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.info", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=Path, help=".safetensors, authors' .pth or Google .npz")
    p.add_argument("--config", help="required for .pth and .npz: a config name, JSON or JSON file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--save-config", type=Path, metavar="FILE",
                   help="also write the checkpoint's config as a JSON file, for model.train --config "
                        "(e.g. to fine-tune it with --init)")
    args = p.parse_args(argv)
    try:
        fmt = check_checkpoint_file(args.file)
        if fmt != "safetensors" and args.config is None:
            kind = {"official": "PyTorch (.pth)", "npz": ".npz"}[fmt]
            raise CheckpointError(f"{args.file}: a {kind} checkpoint holds no architecture; "
                                  "pass --config (paper, small, tiny, a JSON config or a JSON file)")
        info = describe(args.file, args.config)
    except (CheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.save_config is not None:
        try:
            text = json.dumps(info["config"], indent=2) + "\n"
            atomic_write(args.save_config, lambda tmp: Path(tmp).write_text(text))
        except OSError as exc:
            print(f"error: --save-config {args.save_config}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    cfg, n = info["config"], info["parameters"]
    print(f"file         {info['file']}")
    print(f"fingerprint  {info['fingerprint']}")
    print(f"config       {cfg['name']}: hidden {cfg['hidden_size']}, layers {cfg['num_layers']}, heads {cfg['num_heads']}, "
          f"mlp {cfg['mlp_dim']}, stem units {cfg['resnet_units']} x{cfg['resnet_width_factor']}, attention {cfg['attention']}")
    print(f"inputs       ground {cfg['ground_size']}, aerial {cfg['aerial_size']} (polar {cfg['polar']}, "
          f"intermediate {cfg['polar_intermediate']})")
    print(f"descriptor   {info['embedding_dim']}-d unit vector, test-time flip {'on' if cfg['test_time_flip'] else 'off'}")
    if cfg["orientation_dim"]:
        reads = "each column's token rows side by side" if cfg["orientation_rows"] else "each column's mean token"
        kind = f"a {cfg['orientation_hidden']}-wide GELU layer" if cfg["orientation_hidden"] else "linear"
        photo = ", and a ground map for phone photos" if cfg.get("orientation_photo") else ""
        print(f"orientation  {cfg['orientation_dim']}-d column features from {reads}, {kind}{photo}")
    print(f"parameters   ground {n['ground']:,}, aerial {n['aerial']:,}, total {n['total']:,}")
    print(f"provenance   {json.dumps(info['provenance'], sort_keys=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
