"""Ablation on the synthetic world: self-cross vs vanilla attention, polar transform on vs off.

Every variant trains with the same budget (steps, batch, data) for each seed and is evaluated
on an unseen region; prints a Markdown table of mean (and per-seed) recalls.

  python bench/ablation.py --train data/train_world --eval data/eval_world --steps 600 --seeds 0 1 \
      --out runs/ablation

`views`: limited fields of view and unknown headings (issue 16). Each checkpoint (e.g. the same
network before and after a fine-tune of the same budget) and each way of finding the heading (the
orientation head, the head after re-ranking the best tiles by column alignment, or descriptors of the
aerial tiles / of the query at N turns) is evaluated on one
unseen region and gallery, for each field of view and heading mode; a Markdown table of R@1/5/10/1%,
the ratio to the checkpoint's known-heading 360 degree R@1, and the median heading error. With
`rerank` among the methods, the known-heading views are also re-ranked (a row of their own):

  python bench/ablation.py views --eval data/eval_world --checkpoint shipped=weights/l2ltr_tiny_demo.safetensors \
      --checkpoint fov=runs/orientation/tiny_fov_head.safetensors --fov 360 180 90 70 --methods head rerank aerial query
"""
from __future__ import annotations

import argparse
import hashlib
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


def views_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench/ablation.py views", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval", required=True, help="unseen evaluation world")
    p.add_argument("--split", default="all", help="its split")
    p.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH", help="checkpoints to compare")
    p.add_argument("--fov", type=float, nargs="+", default=[360, 180, 90, 70], help="fields of view, degrees")
    p.add_argument("--methods", nargs="+", default=["head", "rerank", "aerial", "query"],
                   help="ways to find the heading: head, rerank, aerial, query (model.evaluate --method)")
    p.add_argument("--rotations", type=int, default=16, help="turns searched by the aerial and query methods")
    p.add_argument("--queries", type=int, default=0, help="the first N pairs are the queries (0: all)")
    p.add_argument("--photos", help="a perspective world of the same region: its photos as queries too")
    p.add_argument("--out", default="runs/ablation_views", help="where each evaluation's JSON is kept (reused)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def evaluate(name: str, checkpoint: str, extra: list[str]) -> dict:
        # kept per checkpoint file, region, split and query count too: a cell is never another one's
        setting = json.dumps([os.path.realpath(checkpoint), os.path.realpath(args.eval), args.split, args.queries])
        tag = hashlib.sha256(setting.encode()).hexdigest()[:10]
        key = out / (name + "_" + tag + "_" + "_".join(extra).replace("-", "").replace(" ", "").replace("/", "_")
                     + ".json")
        if not key.exists():
            cmd = [sys.executable, "-m", "model.evaluate", "--checkpoint", checkpoint, "--data", args.eval,
                   "--split", args.split, "--json", "--queries", str(args.queries), *extra]
            key.write_text(run(cmd))
        return json.loads(key.read_text())

    print("| checkpoint | queries | heading | method | R@1 | R@5 | R@10 | R@1% | x known 360 R@1 | heading error (median) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, checkpoint in (item.split("=", 1) for item in args.checkpoint):
        base = evaluate(name, checkpoint, ["--fov", "360", "--heading", "known"])
        cases = [(f"{f:g} deg crops", ["--fov", str(f)]) for f in args.fov]
        if args.photos:
            cases.append(("photos", ["--photos", args.photos]))
        for label, view in cases:
            runs = [("known", "", [])] + [("known", "rerank", ["--method", "rerank"])] * ("rerank" in args.methods) \
                + [("unknown", m, ["--method", m, "--rotations", str(args.rotations)]) for m in args.methods]
            for heading, method, extra in runs:
                try:
                    r = evaluate(name, checkpoint, [*view, "--heading", heading, *extra])
                except SystemExit as exc:  # e.g. no orientation head for --method head
                    print(f"| {name} | {label} | {heading} | {method} | failed: {str(exc).splitlines()[-1][:80]} |")
                    continue
                err = r.get("heading_error_median_deg")
                print(f"| {name} | {label} | {heading} | {method or '-'} | {100 * r['r1']:.2f} | {100 * r['r5']:.2f} | "
                      f"{100 * r['r10']:.2f} | {100 * r['r1pct']:.2f} | {r['r1'] / max(base['r1'], 1e-9):.2f} | "
                      f"{'-' if err is None else f'{err:.1f} deg'} |", flush=True)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["views"]:
        return views_main(argv[1:])
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
        request = {"train": os.path.realpath(args.train), "config": args.config, "steps": args.steps, "seed": seed,
                   "variant": VARIANTS[name], "extra": args.extra.split(), "eval": os.path.realpath(args.eval),
                   "eval_split": args.eval_split}
        recorded = run_dir / "request.json"  # what the run in run_dir was made with: reused only for the same
        if recorded.exists() and json.loads(recorded.read_text()) != request:
            raise SystemExit(f"bench/ablation.py: {run_dir} holds a run made with other settings ({recorded}); "
                             "use another --out")
        if not recorded.exists() and (summary_file.exists() or (run_dir / "train_state.pt").exists()):
            raise SystemExit(f"bench/ablation.py: {run_dir} holds a run made before its settings were recorded "
                             "(no request.json): use another --out")
        if not summary_file.exists():
            run_dir.mkdir(parents=True, exist_ok=True)
            recorded.write_text(json.dumps(request))
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
