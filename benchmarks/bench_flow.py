#!/usr/bin/env python
"""Where a flow run's time goes: wall time, and the seconds of each step's tasks, model steps against model-free ones.

Runs AttentionFlow (this checkout's, or --flow another one's: an older commit in a git worktree, for a before and
after measured in one session) in a datastore of its own, --repeats times, and reads every task's start and finish
back through the Client API. Model steps are those the flow file gives @resources (they load the model); the others
only plan, join and report.

    python benchmarks/bench_flow.py --json /tmp/flow.json                        # the default demo run, 100 problems
    python benchmarks/bench_flow.py --tiny --param heads=false --param validate=false --param thought_analysis=false
    python benchmarks/bench_flow.py --tiny --flow /tmp/old/flows/attention_flow.py  # another commit's flow

--tiny runs a random-weight two-layer GPT-2 CODI (codi_attn.fixtures) on 6 GSM8K problems, decoding 4 tokens: the
flow's own overhead, as the tests' flow runs see it.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_extract import DEFAULT_GSM8K, HelpFormatter, machine_info  # noqa: E402

FLOW_FILE = REPO / "flows" / "attention_flow.py"
TINY = {"model": "gpt2", "n_problems": "6", "shard_size": 4, "batch_size": 3, "max_new_tokens": 4, "device": "cpu",
        "dtype": "float32", "n_boot": 10, "validate_k": 2, "validate_random": 1, "head_random_sets": 4}


def model_steps(flow_file: Path) -> set[str]:
    """The steps the flow file decorates with @resources (the ones that load the model)."""
    spec = next(n for n in ast.parse(flow_file.read_text()).body if isinstance(n, ast.ClassDef)
                and any(isinstance(f, ast.FunctionDef) and f.name == "start" for f in n.body))  # the FlowSpec
    return {f.name for f in spec.body if isinstance(f, ast.FunctionDef) and any(
        isinstance(d, ast.Call) and getattr(d.func, "id", None) == "resources" for d in f.decorator_list)}


def task_times(run) -> list[tuple[str, float]]:
    """(step, seconds from the task's start to its finish) of every task of a Client API Run, in start order."""
    tasks = sorted(((t.created_at, t.finished_at, s.id) for s in run for t in s), key=lambda row: row[0])
    return [(step, (finished - created).total_seconds()) for created, finished, step in tasks]


def summarise(times: list[tuple[str, float]], model: set[str]) -> dict:
    """Tasks and their seconds in all, for the model steps and for the model-free ones, and per step."""
    per_step: dict[str, float] = {}
    for step, seconds in times:
        per_step[step] = per_step.get(step, 0.0) + seconds
    free = [s for step, s in times if step not in model]
    return {"tasks": len(times), "task_seconds": sum(s for _, s in times),
            "model_tasks": len(times) - len(free), "model_task_seconds": sum(s for step, s in times if step in model),
            "model_free_tasks": len(free), "model_free_task_seconds": sum(free),
            "model_free_seconds_per_task": sum(free) / len(free) if free else 0.0, "per_step": per_step}


def parse_param(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--param takes NAME=VALUE (a flow parameter), got {text!r}")
    return name, value


def parameter_types(flow_file: Path) -> dict[str, type]:
    """name -> type of every `Parameter(name, ..., type=T)` of the flow file (str where it names none)."""
    types = {"bool": bool, "int": int, "float": float, "str": str}
    return {ast.literal_eval(c.args[0]): types[next((k.value.id for k in c.keywords if k.arg == "type"), "str")]
            for c in ast.walk(ast.parse(flow_file.read_text()))
            if isinstance(c, ast.Call) and getattr(c.func, "id", None) == "Parameter"}


def typed(params: dict[str, str], types: dict[str, type]) -> dict:
    """The --param values as the flow's parameters take them (Metaflow's Runner checks the types)."""
    out = {}
    for name, value in params.items():
        if name not in types:
            raise ValueError(f"--param {name}: the flow has no such parameter (it has {', '.join(sorted(types))})")
        kind = types[name]
        if kind is bool:
            if value.lower() not in ("true", "false"):
                raise ValueError(f"--param {name}={value}: true or false")
            out[name] = value.lower() == "true"
        else:
            try:
                out[name] = kind(value)
            except ValueError:
                article = "an" if kind is int else "a"
                raise ValueError(f"--param {name}={value}: not {article} {kind.__name__}") from None
    return out


def run_once(flow_file: Path, params: dict, root: Path):
    """One `run` in a datastore under `root`; the Client API Run (ValueError with its output if it failed)."""
    from metaflow import Runner, metadata, namespace

    root.mkdir(parents=True)
    env = {"METAFLOW_DATASTORE_SYSROOT_LOCAL": str(root), "USERNAME": os.environ.get("USERNAME", "bench")}
    with Runner(str(flow_file), show_output=False, env=env, cwd=str(root), pylint=False) as runner:
        result = runner.run(**params)
        if result.status != "successful":
            raise ValueError(f"the flow run failed:\n{result.stderr[-3000:]}")
        pathspec = result.run.pathspec
    metadata(f"local@{root}")
    namespace(None)
    from metaflow import Run

    return Run(pathspec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--flow", type=Path, default=FLOW_FILE, help="the flow file to run (another commit's, to compare)")
    p.add_argument("--tiny", action="store_true", help="a random-weight tiny GPT-2 CODI on 6 GSM8K problems "
                                                       "instead of the default demo run")
    p.add_argument("--gsm8k", type=Path, default=DEFAULT_GSM8K, help="GSM8K train.jsonl (--tiny)")
    p.add_argument("--param", type=parse_param, action="append", default=[], metavar="NAME=VALUE",
                   help="a flow parameter, e.g. heads=false (repeatable)")
    p.add_argument("--repeats", type=int, default=1, help="runs, one after the other")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be 1 or more")
    if not args.flow.is_file():
        p.error(f"--flow {args.flow}: no such file")
    if args.tiny and not args.gsm8k.is_file():
        p.error(f"--gsm8k {args.gsm8k}: no such file (GSM8K's train.jsonl, for --tiny)")

    try:
        params = typed(dict(args.param), parameter_types(args.flow))
    except ValueError as e:
        p.error(str(e))
    work = Path(tempfile.mkdtemp(prefix="bench_flow_"))
    if args.tiny:
        sys.path.insert(0, str(REPO))
        from codi_attn.fixtures import build_tiny_codi

        base, ckpt = build_tiny_codi(work / "model", "gpt2")
        params = {**TINY, "base": str(base), "ckpt": str(ckpt), "dataset": str(args.gsm8k), **params}
    model = model_steps(args.flow)
    runs = []
    for i in range(args.repeats):
        started = time.perf_counter()
        run = run_once(args.flow, params, work / f"ds{i}")
        wall = time.perf_counter() - started
        runs.append({"wall_seconds": wall, **summarise(task_times(run), model)})
        r = runs[-1]
        print(f"run {i + 1}: {wall:.1f} s wall; {r['tasks']} tasks, {r['task_seconds']:.1f} s; "
              f"{r['model_tasks']} model tasks {r['model_task_seconds']:.1f} s; {r['model_free_tasks']} model-free "
              f"tasks {r['model_free_task_seconds']:.1f} s ({r['model_free_seconds_per_task']:.2f} s each)", flush=True)
    out = {"flow": str(args.flow), "params": {k: str(v) for k, v in params.items()}, "runs": runs,
           "machine": machine_info(torch.device("cpu"))}  # the CPU's name: numbers compare only on one kind
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
