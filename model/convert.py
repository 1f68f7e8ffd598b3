"""Convert the authors' model_checkpoint.pth or a Google ViT .npz to our .safetensors format.

  python -m model.convert --from official --config paper --in model_checkpoint.pth --out l2ltr_cvusa.safetensors
  python -m model.convert --from npz --config paper --in R50+ViT-B_16.npz --out init.safetensors
  python -m model.convert --from ours --in runs/x/last.safetensors --out demo.safetensors --dtype float16 --test-time-flip on
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .arguments import output_file
from .checkpoint import CheckpointError, detect_format, load_checkpoint, save_checkpoint
from .config import ConfigError, L2LTRConfig

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", choices=["official", "npz", "ours"], required=True,
                   help="official: the authors' {'model_grd','model_sat'} .pth; npz: Google's R50+ViT .npz (both "
                        "branches); ours: one of our .safetensors (to change its storage dtype or inference options)")
    p.add_argument("--config",
                   help="a config name (paper, small, tiny), a JSON object, or a path to a JSON file "
                        "(required for official and npz; ours carries its own)")
    p.add_argument("--test-time-flip", choices=["on", "off"],
                   help="set the inference option: descriptors averaged with the mirrored view's (2x encoding cost)")
    p.add_argument("--in", dest="inp", required=True, type=Path, help="input checkpoint file")
    p.add_argument("--out", required=True, type=output_file, help="output .safetensors file (written atomically)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="storage dtype (default float32)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out.suffix != ".safetensors":
        print(f"error: --out must end in .safetensors, got {args.out}", file=sys.stderr)
        return 2
    if args.config is None and args.source != "ours":
        print(f"error: --config is required with --from {args.source}", file=sys.stderr)
        return 2
    try:
        config = L2LTRConfig.resolve(args.config) if args.config is not None else None
        if not args.inp.is_file():
            raise CheckpointError(f"input {args.inp} does not exist")
        found = {"safetensors": "ours"}.get(detect_format(args.inp), detect_format(args.inp))
        if found != args.source:
            raise CheckpointError(f"{args.inp} looks like a {found} file, not --from {args.source}")
        model = load_checkpoint(args.inp, config=config)
        if args.test_time_flip is not None:
            model.config = model.config.replace(test_time_flip=args.test_time_flip == "on")
        config = model.config
        fingerprint = save_checkpoint(model, args.out, dtype=DTYPES[args.dtype],
                                      metadata={**getattr(model, "provenance", {}),
                                                "converted_from": args.source, "source_file": args.inp.name})
    except (CheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing written", file=sys.stderr)
        return 130
    print(f"wrote {args.out} (config {config.name}, fingerprint {fingerprint})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
