"""Plot a training run's log.jsonl: loss and recall curves -> PNG.

  python -m model.plot runs/tiny/log.jsonl --out runs/tiny/curves.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_log(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON ({exc})") from None
    return rows


def plot_log(rows: list[dict], out: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r.get("event") == "train"]
    evals = [r for r in rows if r.get("event") == "eval"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax1.grid(alpha=0.3)
    for key in ("r1", "r5", "r10", "r1pct"):
        ax2.plot([r["step"] for r in evals], [100 * r[key] for r in evals], marker="o", ms=3, label=key.upper().replace("PCT", "%"))
    ax2.set_xlabel("step")
    ax2.set_ylabel("recall (%)")
    ax2.set_ylim(0, 100)
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", type=Path, help="a run's log.jsonl")
    p.add_argument("--out", type=Path, help="PNG path (default: curves.png beside the log)")
    args = p.parse_args(argv)
    if not args.log.is_file():
        print(f"error: {args.log} does not exist", file=sys.stderr)
        return 1
    try:
        rows = read_log(args.log)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = args.out or args.log.with_name("curves.png")
    plot_log(rows, out, title=str(args.log.parent.name))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
