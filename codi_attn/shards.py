"""Sharded extraction for AttentionFlow: one shard's problems in batches, failures kept per problem,
and the join that puts every shard back in sample order."""
from __future__ import annotations

import os
import signal
from collections import Counter

import numpy as np

from codi_attn.checkpoints import Checkpoints, remembered
from codi_attn.conventions import MASS_PARTS, N_THOUGHTS
from codi_attn.metrics import baseline_of, incoming

# Test hooks, read only by the tests (tests/test_flow.py, tests/test_s3.py); a normal run never sets them.
#   CODI_ATTN_FAIL_SHARD=K[:kill][:after=B]  shard K raises (kill: SIGKILLs itself) once it has computed B batches
#                                            (default 1; batches read back from a checkpoint do not count)
#   CODI_ATTN_FAIL_PROBLEMS=a,b              these problem ids raise inside extraction
FAIL_SHARD_ENV = "CODI_ATTN_FAIL_SHARD"
FAIL_PROBLEMS_ENV = "CODI_ATTN_FAIL_PROBLEMS"


def _fail_hook(shard_index: int, computed: int) -> None:
    """Test hook: die the way a shard task can die (exception or SIGKILL) when asked to."""
    spec = os.environ.get(FAIL_SHARD_ENV, "")
    if not spec:
        return
    index, *options = spec.split(":")
    after = next((int(o.split("=", 1)[1]) for o in options if o.startswith("after=")), 1)
    if int(index) != shard_index or computed != after:
        return
    if "kill" in options:
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"test hook {FAIL_SHARD_ENV}={spec}: shard {shard_index} fails on purpose")


class ShardError(RuntimeError):
    """Extraction that cannot go on: a shard over --max_failed_fraction, or no problem extracted at all."""


METAFLOW_MAX_WORKERS = 16  # Metaflow's default --max-workers: how many foreach tasks a local run starts at once


def cpu_threads_per_shard(n_shards: int, cpus: int | None = None, max_workers: int = METAFLOW_MAX_WORKERS) -> int:
    """Threads for one shard's CPU extraction: the usable cores shared by the shards a local run executes at
    once (up to max_workers), at least 1. Each task taking every core would oversubscribe the machine:
    on 2 cores, two 2-thread shards ran slower than two 1-thread shards."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // max(1, min(n_shards, max_workers)))


def extract_shard(model, problems: list[dict], batch_size: int, max_new_tokens: int, on_batch=None,
                  shard_index: int = 0, checkpoints: Checkpoints | None = None) -> dict:
    """Extract the problems of one shard in batches. A question that is empty or too long fails alone, before
    any batch; a batch that raises is retried problem by problem, so one bad problem costs only itself; each
    failure is recorded as {'id', 'error'}, in input order. With `checkpoints`, each finished batch is saved as
    `batch-{i}`, and a batch found there is read back instead of extracted, but for its failed problems, which are
    extracted again (and the batch saved again).

    Returns ids, attention float16 [n, L, H, 6, 6], mass float16 [n, L, H, 6, 4], texts, predictions
    float64 [n], correct bool [n] for the n problems that succeeded (in input order), and failed.
    """
    from codi_attn.extract import extract  # here: the join steps read this module without loading torch
    from codi_attn.runner import question_tokens

    fail_ids = set(filter(None, os.environ.get(FAIL_PROBLEMS_ENV, "").split(",")))

    def run(chunk):
        bad = [problems[k]["id"] for k in chunk if problems[k]["id"] in fail_ids]
        if bad:
            raise RuntimeError(f"test hook {FAIL_PROBLEMS_ENV}: {bad[0]} fails on purpose")
        return extract(model, [problems[k]["question"] for k in chunk], [problems[k]["answer"] for k in chunk],
                       batch_size=len(chunk), max_new_tokens=max_new_tokens)

    def batch(chunk) -> tuple[list, list[dict]]:
        """[(problem indices, Extraction)] and the failures of one batch."""
        try:
            return [(chunk, run(chunk))], []
        except Exception:  # find the problem(s) to blame, keep the others
            results, failures = [], []
            for k in chunk:
                try:
                    results.append(([k], run([k])))
                except Exception as e:
                    failures.append({"id": problems[k]["id"], "error": f"{type(e).__name__}: {e}"})
            return results, failures

    n, shape = len(problems), (model.n_layers, model.n_heads, N_THOUGHTS)
    attention = np.zeros((n, *shape, N_THOUGHTS), np.float16)
    mass = np.zeros((n, *shape, len(MASS_PARTS)), np.float16)
    texts, predictions = [""] * n, np.full(n, np.nan)
    correct, ok = np.zeros(n, bool), np.zeros(n, bool)
    failed = {}  # position -> {'id', 'error'}
    position = {p["id"]: k for k, p in enumerate(problems)}
    for k, p in enumerate(problems):  # an empty or too long question fails alone, named by its id
        try:
            question_tokens(model, p["question"], f"the question of {p['id']}")
        except ValueError as e:
            failed[k] = {"id": p["id"], "error": f"ValueError: {e}"}
    computed = []
    for b, start in enumerate(range(0, n, batch_size)):
        chunk = [k for k in range(start, min(n, start + batch_size)) if k not in failed]

        def compute(chunk=chunk, b=b):
            computed.append(b)
            return batch(chunk) if chunk else ([], [])

        def redo(saved, b=b):
            """A saved batch's failed problems tried again (an error may pass: out of memory); None if none failed."""
            results, failures = saved
            if not failures:
                return None
            computed.append(b)
            again, failures = batch([position[f["id"]] for f in failures])
            return results + again, failures

        results, failures = remembered(checkpoints, f"batch-{b}", compute, redo)
        failed |= {position[f["id"]]: f for f in failures}
        for idx, ex in results:
            attention[idx], mass[idx] = ex.attention, ex.mass
            predictions[idx], correct[idx], ok[idx] = ex.prediction, ex.correct, True
            for k, text in zip(idx, ex.text):
                texts[k] = text
        if on_batch is not None:
            on_batch(min(n, start + batch_size), len(failed))
        if computed and computed[-1] == b:
            _fail_hook(shard_index, len(computed))
    return {"ids": [p["id"] for p, good in zip(problems, ok) if good],
            "attention": attention[ok], "mass": mass[ok], "texts": [t for t, good in zip(texts, ok) if good],
            "predictions": predictions[ok], "correct": correct[ok], "failed": [failed[k] for k in sorted(failed)]}


def outcome_line(what: str, n: int, correct: np.ndarray, failed: list[dict], shown: int = 5) -> str:
    """The console line of an extraction (a shard's or the run's) over n problems, as its card counts them:
    extracted, failed with their ids, accuracy on the extracted (`correct` bool [n extracted])."""
    ids = ", ".join(f["id"] for f in failed[:shown]) + (", ..." if len(failed) > shown else "")
    acc = f"{100 * float(correct.mean()):.1f}%" if len(correct) else "n/a"
    return (f"{what}: {len(correct)} of {n} problems extracted, {len(failed)} failed" + (f" ({ids})" if failed else "")
            + f"; accuracy {acc} of the extracted")


def check_failures(failed: list[dict], n: int, max_fraction: float, shard_index: int) -> None:
    """Fail the shard (shard_index from 0) when more than max_fraction of its n problems raised."""
    if len(failed) > max_fraction * n:
        raise ShardError(f"shard {shard_index + 1}: {len(failed)} of {n} problems failed, more than "
                         f"--max_failed_fraction={max_fraction}; first: {failed[0]['id']}: {failed[0]['error']}. "
                         "`resume` extracts the failed problems again and reads the others back")


def merge_shards(sampled_ids: list[str], shards: list[dict]) -> dict:
    """Concatenate shard results in sample order; every sampled id must come back exactly once,
    either extracted or failed, and no other id may appear."""
    counts = Counter(i for s in shards for i in s["ids"]) + Counter(f["id"] for s in shards for f in s["failed"])
    dupes = sorted(i for i, c in counts.items() if c > 1)
    lost = [i for i in sampled_ids if i not in counts]
    extra = sorted(set(counts) - set(sampled_ids))
    if dupes or lost or extra:
        raise RuntimeError(f"shards do not cover the sample exactly once: duplicated {dupes[:5]}, "
                           f"lost {lost[:5]}, unknown {extra[:5]}")
    where = {i: (s, k) for s, shard in enumerate(shards) for k, i in enumerate(shard["ids"])}
    ids = [i for i in sampled_ids if i in where]
    order = [where[i] for i in ids]

    def gather(key):
        return [shards[s][key][k] for s, k in order]

    position = {i: n for n, i in enumerate(sampled_ids)}
    failed = sorted((f for s in shards for f in s["failed"]), key=lambda f: position[f["id"]])
    if not ids:
        raise ShardError(f"no problem was extracted ({len(failed)} failed); first error: {failed[0]['id']}: "
                         f"{failed[0]['error']}")
    return {"ids": ids,
            "attention": np.stack(gather("attention")).astype(np.float16),
            "mass": np.stack(gather("mass")).astype(np.float16),
            "texts": gather("texts"), "predictions": np.array(gather("predictions"), np.float64),
            "correct": np.array(gather("correct"), bool), "failed": failed}


def attention_stats(attention, mass, mass_parts) -> dict:
    """Where the thought queries' attention goes, on raw weights, over all problems, layers and heads.

    incoming[j] is codi_attn.metrics.incoming of the mean matrix (mean weight thought j gets from the
    thoughts i >= j + 2; nan for z5, z6), incoming_baseline[j] the same under causal-uniform attention
    with the same row masses (codi-spec trap 7), incoming_lift their ratio. Per-head hubs with
    intervals are the metrics step's business; these are the run's overall numbers.
    """
    a = attention.astype(np.float32)
    m = mass.astype(np.float32)
    mean = a.mean(axis=(0, 1, 2), dtype=np.float64)  # [6, 6] over problems, layers, heads
    observed, baseline = incoming(mean), incoming(baseline_of(mean, "raw"))
    with np.errstate(invalid="ignore", divide="ignore"):
        lift = observed / baseline
    return {
        "n_problems": int(a.shape[0]),
        "mass_parts": list(mass_parts),
        "mass_mean": {p: float(v) for p, v in zip(mass_parts, m.mean(axis=(0, 1, 2, 3)))},
        "mass_by_layer": m.mean(axis=(0, 2, 3)).tolist(),
        "self_attention": float(np.diagonal(mean).mean()),
        "incoming": observed.tolist(),
        "incoming_baseline": baseline.tolist(),
        "incoming_lift": lift.tolist(),
    }
