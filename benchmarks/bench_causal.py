#!/usr/bin/env python
"""Cost of the causal analyses as multiples of one extraction on the same problems.

Runs `codi_attn.extract.extract` once on N problems, then on the same problems and batch size
  - `codi_attn.validate_run.run_validation` with the flow's defaults (k = 10 capped at a quarter of the heads,
    5 random controls, mean ablation at the thought positions, blocking, latent swap, no-op):
    `validation_over_extraction`;
  - with --scan, `codi_attn.heads_run.scan_heads` (each head ablated alone, kinds mean, zero, resample, at the
    thoughts) on every head or on the first --scan-heads of them: `scan_over_extraction`, and per head and
    kind `scan_condition_over_extraction`;
  - with --thoughts, `codi_attn.contents_run.analyse_thoughts`: `thoughts_over_extraction`;
and reports the times and the ratios, measured in one process on one machine. The conditions run stacked
--condition-rows rows to a forward (the flow's default) unless it is 0.

    python benchmarks/bench_causal.py --model demo --n-problems 100 --scan --json /tmp/causal_demo.json
    python benchmarks/bench_causal.py --shape gpt2 --n-problems 32 --max-new-tokens 16 --scan --scan-heads 12
    python benchmarks/bench_causal.py --model demo --condition-rows 0 --thoughts   # one condition at a time

`--model demo` runs the shipped demo model on its held-out synthetic split (real answers, so decoding stops at
the stop token); `--shape gpt2|tiny` runs a random-weight model of that shape on GSM8K questions, which decodes
the whole --max-new-tokens budget.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_extract import DEFAULT_GSM8K, HelpFormatter, build_model, machine_info  # noqa: E402


def problems(args) -> tuple[list[str], list[str], list[str]]:
    """(questions, gold answers, solutions) of the seed-42 sample."""
    from codi_attn.data import DatasetError, load_records, sample_problems

    try:
        records = load_records("synthetic", "test") if args.model == "demo" else load_records(str(args.gsm8k), "train")
    except DatasetError as e:
        raise SystemExit(f"--gsm8k: {e}") from None
    split = "test" if args.model == "demo" else "train"
    sample = sample_problems(records, args.n_problems, seed=42, split=split)
    return [p.question for p in sample], [p.answer for p in sample], [p.solution for p in sample]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", choices=("demo",), default=None,
                   help="the shipped demo model, on its synthetic test split (what runs without --shape)")
    p.add_argument("--shape", choices=("tiny", "gpt2", "llama"), default=None,
                   help="a random-weight model of this shape instead of the demo")
    p.add_argument("--n-problems", type=int, default=100, help="problems of the seed-42 sample")
    p.add_argument("--batch-size", type=int, default=16, help="problems per forward batch")
    p.add_argument("--max-new-tokens", type=int, default=256, help="decode budget (random weights use all of it)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--gsm8k", type=Path, default=DEFAULT_GSM8K, help="GSM8K JSONL file of the --shape models")
    p.add_argument("--scan", action="store_true", help="also time the single-head scan (codi_attn.heads)")
    p.add_argument("--scan-heads", type=int, default=0, help="heads the scan times (0: every head)")
    p.add_argument("--skip-validation", action="store_true", help="time the scan only")
    p.add_argument("--condition-rows", type=int, default=None,
                   help="rows of one forward when conditions run together (the flow's --condition_rows; default "
                        "the flow's, 0: one condition at a time)")
    p.add_argument("--thoughts", action="store_true",
                   help="also time analyse_thoughts (codi_attn.contents; the demo model's synthetic records)")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    if args.model is not None and args.shape is not None:
        p.error("--model demo and --shape are two models: give one")
    if args.model is None and args.shape is None:
        args.model = "demo"
    if args.threads:
        torch.set_num_threads(args.threads)
    from codi_attn.extract import extract
    from codi_attn.metrics import analyze
    from codi_attn.model import load_codi
    from codi_attn.runner import CONDITION_ROWS, stack_for
    from codi_attn.validate_run import run_validation

    questions, golds, solutions = problems(args)  # a bad --gsm8k fails before a model is built
    if args.model == "demo":
        model = load_codi("demo", device="cpu", dtype="float32")
    else:
        import tempfile

        model = build_model(args.shape, "cpu", "float32", Path(tempfile.mkdtemp()))
    kwargs = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    rows = CONDITION_ROWS if args.condition_rows is None else args.condition_rows
    stack = stack_for(args.batch_size, rows)
    t_extract = math.inf
    for _ in range(3):  # the best of three: the first pays one-time costs, and it is the ratios' denominator
        t0 = time.perf_counter()
        ex = extract(model, questions, golds, **kwargs)
        t_extract = min(t_extract, time.perf_counter() - t0)
    ranked = analyze(ex.attention, ex.mass, n_boot=0).ranked_heads
    import inspect

    out = {"model": model.name, "n_problems": len(questions), "batch_size": args.batch_size,
           "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(),
           "condition_rows": rows, "stack": stack, "extraction_s": round(t_extract, 3), "accuracy": float(np.mean(ex.correct))}
    if not args.skip_validation:
        t0 = time.perf_counter()
        if "solutions" in inspect.signature(run_validation).parameters:
            extra = {"stack": stack} if "stack" in inspect.signature(run_validation).parameters else {}
            result = run_validation(model, questions, golds, solutions, ranked, **kwargs, **extra)
        else:  # the API before the runner (commit 2e7240a and earlier), for before/after comparisons
            result = run_validation(model, questions, solutions, ranked, **kwargs)
        t_validation = time.perf_counter() - t0
        out |= {"validation_s": round(t_validation, 3), "validation_over_extraction": round(t_validation / t_extract, 2),
                "validation_conditions": len(result.validation) - 1}  # the baseline row is the reference run
    if args.scan:
        from codi_attn.heads_run import all_heads, scan_heads

        heads = all_heads(model)[: args.scan_heads or None]
        t0 = time.perf_counter()
        scan = scan_heads(model, questions, golds, solutions, heads, ("mean", "zero", "resample"), **kwargs,
                           stack=stack)
        t_scan = time.perf_counter() - t0
        out |= {"scan_heads": len(heads), "scan_conditions": len(scan), "scan_s": round(t_scan, 3),
                "scan_over_extraction": round(t_scan / t_extract, 2),
                "scan_condition_over_extraction": round(t_scan / t_extract / len(scan), 3)}
    if args.thoughts:
        from codi_attn.contents_run import analyse_thoughts

        records = [{"id": str(i), "question": q, "answer": g, "solution": s}
                   for i, (q, g, s) in enumerate(zip(questions, golds, solutions))]
        t0 = time.perf_counter()
        analyse_thoughts(model, records, args.model == "demo", (), n_boot=200, stack=stack, **kwargs)
        t_thoughts = time.perf_counter() - t0
        out |= {"thoughts_s": round(t_thoughts, 3), "thoughts_over_extraction": round(t_thoughts / t_extract, 2)}
    out |= {"machine": machine_info(torch.device("cpu")), "python": platform.python_version()}
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
