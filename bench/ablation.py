"""Ablation on the synthetic world: self-cross vs vanilla attention, polar transform on vs off.

Every variant trains with the same budget (steps, batch, data) for each seed and is evaluated
on an unseen region; prints a Markdown table of mean (and per-seed) recalls.

  python bench/ablation.py --train data/train_world --eval data/eval_world --steps 600 --seeds 0 1 \
      --out runs/ablation
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "self-cross + polar": [],
    "vanilla + polar": ["--attention", "vanilla"],
    "self-cross, no polar": ["--no-polar"],
    "vanilla, no polar": ["--attention", "vanilla", "--no-polar"],
}


def run(cmd: list[str], env: dict | None = None) -> str:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return proc.stdout


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="training world directory")
    p.add_argument("--eval", required=True, help="unseen evaluation world directory")
    p.add_argument("--eval-split", default="all")
    p.add_argument("--config", default="tiny")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"subset of {list(VARIANTS)}")
    p.add_argument("--extra", default="", help="extra arguments for model.train, e.g. '--loss infonce --lr 3e-4'")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--parallel", type=int, default=1,
                   help="runs trained side by side, each with cores/parallel torch threads (on a CPU, "
                        "N single-threaded runs waste less than one run spread over N cores)")
    args = p.parse_args(argv)
    out = Path(args.out)
    threads = max(1, (os.cpu_count() or 1) // max(1, args.parallel))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}

    def one(job: tuple[str, int]) -> dict:
        name, seed = job
        run_dir = out / f"{name.replace(' ', '').replace(',', '_').replace('+', '_')}-s{seed}"
        summary_file = run_dir / "eval.json"
        if not summary_file.exists():
            started = time.time()
            cmd = [sys.executable, "-m", "model.train", "--data", args.train, "--config", args.config,
                   "--out", str(run_dir), "--steps", str(args.steps), "--seed", str(seed), "--eval-every", "0",
                   "--threads", str(threads), "--quiet", *VARIANTS[name], *args.extra.split()]
            if (run_dir / "train_state.pt").exists():
                cmd.append("--resume")
            run(cmd, env)
            minutes = (time.time() - started) / 60
            ev = json.loads(run([sys.executable, "-m", "model.evaluate", "--checkpoint", str(run_dir / "last.safetensors"),
                                 "--data", args.eval, "--split", args.eval_split, "--json", "--workers", "1"], env))
            ev["train_minutes"] = minutes
            summary_file.write_text(json.dumps(ev))
        r = json.loads(summary_file.read_text())
        print(f"{name} seed {seed}: R@1 {r['r1']:.3f} R@5 {r['r5']:.3f} R@1% {r['r1pct']:.3f} (N={r['n']}, "
              f"{r['train_minutes']:.1f} min)", flush=True)
        return r

    jobs = [(name, seed) for name in args.variants for seed in args.seeds]
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        done = list(pool.map(one, jobs))
    results: dict[str, list[dict]] = {}
    for (name, _), r in zip(jobs, done):
        results.setdefault(name, []).append(r)
    print(f"\n{args.steps} steps of `{args.config}` per run, seeds {args.seeds}, evaluated on {args.eval} ({args.eval_split})\n")
    print("| variant | R@1 | R@5 | R@10 | R@1% | per-seed R@1 |")
    print("|---|---|---|---|---|---|")
    for name, rows in results.items():
        mean = {k: 100 * sum(r[k] for r in rows) / len(rows) for k in ("r1", "r5", "r10", "r1pct")}
        per = ", ".join(f"{100 * r['r1']:.1f}" for r in rows)
        print(f"| {name} | {mean['r1']:.1f} | {mean['r5']:.1f} | {mean['r10']:.1f} | {mean['r1pct']:.1f} | {per} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
