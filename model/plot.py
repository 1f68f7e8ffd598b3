"""Plot a training run's log.jsonl: loss and recall curves -> PNG.

  python -m model.plot runs/tiny/log.jsonl --out runs/tiny/curves.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .arguments import output_file
from .atomic import atomic_write


def log_lines(path: Path) -> list[tuple[str, dict]]:
    """Each record of a run's log.jsonl with its line. A torn last line, as a run stopped while writing
    it leaves, is left out; any other line that is not a JSON object is an error naming it."""
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if n == len(lines):
                break
            raise ValueError(f"{path}:{n}: not JSON ({exc})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{n}: not a JSON object")
        records.append((line, record))
    return records


def read_log(path: Path) -> list[dict]:
    return [record for _, record in log_lines(path)]


def figure_path(path: str | Path) -> Path:
    """Where matplotlib writes a figure given ``path``: a name without a suffix gets ``.png``."""
    path = Path(path)
    return path if path.suffix else path.with_name(path.name + ".png")


def figure_file(text: str) -> Path:
    """argparse type: an image file to write (`figure_path`), of a format matplotlib writes."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise argparse.ArgumentTypeError("drawing a figure needs matplotlib: pip install '.[plot]'") from None
    path = figure_path(output_file(text))
    kind = path.suffix[1:].lower()
    if kind not in FigureCanvasBase.get_supported_filetypes():
        raise argparse.ArgumentTypeError(f"{text}: matplotlib does not write .{kind} files (.png, .pdf or .svg do)")
    return path


def save_figure(fig, path: Path) -> Path:
    """Write a figure atomically at `figure_path` (path), in the format its suffix names; returns where."""
    path = figure_path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix[1:].lower()))
    return path


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
    save_figure(fig, out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", type=Path, help="a run's log.jsonl")
    p.add_argument("--out", type=figure_file, help="PNG path (default: curves.png beside the log)")
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
