#!/usr/bin/env python
"""Benchmark CODI 6x6 attention extraction: speed, memory and achieved FLOP/s against a matmul peak.

Three variants run on the same model and the same GSM8K problems (a seed-42 sample of
../shared/data/gsm8k/train.jsonl, codi-spec section 6), all with the same fixed greedy decode budget
(--max-new-tokens, default 8; random weights never emit the stop token, so the budget is what runs):

  (a) reference: written the way the design sketches it, with codi-spec's positions. One problem at a
      time; the whole model in eager attention with `output_attentions=True` and `output_hidden_states=True`
      on every forward (prefill, six latents, EOT, decode), through the full causal LM (so the LM head runs
      on every prefill position, as the official code's `model(...)` call does); Python loops over layers
      and heads copy each thought's row out: A[l, h, i, :i+1] = attentions[l][0, h, -1, Q+1 : Q+2+i].
  (b) plain: the project's runner (`codi_attn.runner.Runner`) with no hooks: CODI latent inference without
      any capture, the same length-sorted batches as (c) at (c)'s best batch size, left padding with a 2-D
      mask and per-problem positions, body only with the LM head on the last position; the prefill runs in
      length groups (each group >= 95% real tokens, codi_attn.runner.prefill_groups) that write their keys
      and values into preallocated buffers kept between batches (codi_attn.kv_cache); sdpa for the prefill
      and decoding, eager for the six one-query thought steps (as in (c)); on CPU the one-query steps attend
      only to each row's keys, not to the batch's left padding (codi_attn.windowed_attention).
      This is the floor that (c) is measured against: capture_overhead = time(c) / time(b) - 1, so it
      counts the cost of the capture hook plus anything else (c) does slower than plain inference.
  (c) project: `codi_attn.extract.extract` at the best of the --batch-size values (streamed shard by shard
      over --shard-size problems, so memory stays bounded on the whole split).

Before anything is timed for (c), the bench checks that (a) and (c) give the same 6x6 attention and mass
split (max |diff| <= --atol, default 1e-3) on the reference problems, run inside a batch of the largest
--batch-size so that padding and batching are exercised; it exits with status 2 when they differ. The check
runs in float32 (--check-dtype; a float32 copy of the model when the run is bf16): on random weights the
six-step latent loop amplifies bf16 rounding to differences of ~0.1 (measured at LLaMA shape), as large as
the bugs the check is there to catch, while float32 agrees to ~1e-7 (GPT-2) and ~4e-5 (LLaMA).

FLOP count (analytic, per problem; useful work only, so padding and the reference's extra LM head count
against whoever spends them). T = question tokens + BOT, G = generated tokens (the budget unless a stop
token came first), P = weights of the linear layers inside the decoder blocks (biases and norms left out),
L = layers, d_q = query heads x head dim, d = hidden size, V' = embedding rows (V + 3), p = prj width:

    body tokens        N = T + 6 (latents) + 1 (EOT) + (G - 1) (generated tokens fed back)
    linear layers      2 * P * N
    attention          4 * L * d_q * ( T(T+1)/2  +  sum_{k=1}^{6+1+G-1} (T + k) )   (QK^T and AV, causal)
    projection         6 * 2 * (2 * d * p)
    LM head            G * 2 * d * V'              (only where it runs: once per generated token)

achieved_gflops = (sum over problems of the count above) / time of (c). peak_gflops = the best of a few
timed square matmuls (2048^3 on CPU, 8192^3 on CUDA) in the run's dtype, on the same threads, measured in
the same run (before and after the timed variants; the larger is reported).

Memory: peak RSS of the process (VmHWM, reset before each phase where the kernel allows it), per phase
and overall; on CUDA also torch.cuda.max_memory_allocated per phase. model_mb is the size of the weights.

Examples (from the repository root):

    python benchmarks/bench_extract.py --shape tiny --n-problems 16 --json /tmp/tiny.json
    python benchmarks/bench_extract.py --shape gpt2 --n-problems 48 --batch-size 8,16,32 --json gpt2.json
    python benchmarks/bench_extract.py --shape llama --device cuda --dtype bfloat16 --n-problems 256 \
        --batch-size 64,128 --reference-problems 8 --json bench_llama.json

Timings on a shared machine are noisy: compare ratios measured within one run (speedup, capture_overhead,
achieved/peak), and use --repeats to take the best of several interleaved (b)/(c) runs.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from codi_attn.conventions import N_THOUGHTS

REPO = Path(__file__).resolve().parents[1]
_GSM8K = Path("data") / "gsm8k" / "train.jsonl"
# ../shared next to the repository; a shared/ inside it (device machines copy it there); the workplace's copy
_GSM8K_PLACES = (REPO.parent / "shared" / _GSM8K, REPO / "shared" / _GSM8K, Path("/work/shared") / _GSM8K)
DEFAULT_GSM8K = next((p for p in _GSM8K_PLACES if p.is_file()), _GSM8K_PLACES[0])
SHAPES = ("tiny", "gpt2", "llama")
SWEEP = {"cpu": (4, 8, 16, 32), "cuda": (32, 64, 128, 256)}
EXIT_MISMATCH = 2


# ----------------------------------------------------------------------------------------------- CLI
def parse_batch_sizes(text: str) -> list[int] | None:
    """'16' -> [16]; '8,16,32' -> [8, 16, 32] (sweep, fastest wins); 'best' -> None (the device's default sweep)."""
    if text.strip().lower() == "best":
        return None
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch-size takes an integer, a comma list or 'best', got {text!r}")
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"--batch-size values must be positive integers, got {text!r}")
    return list(dict.fromkeys(sizes))


def parse_n(text: str) -> int | None:
    """A positive problem count, or 'all' / 0 for the whole file (None)."""
    if text.strip().lower() in ("all", "0"):
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--n-problems takes a positive integer or 'all', got {text!r}")
    if n < 0:
        raise argparse.ArgumentTypeError(f"--n-problems must be positive, got {n}")
    return n


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, except where there is none to show (None, or False for a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_extract.py",
        description="Time (a) a design-style batch-of-one reference, (b) plain batched CODI latent inference "
                    "without capture and (c) codi_attn's extractor on the same random-weight CODI model and the "
                    "same GSM8K problems; check (a) == (c); report problems/s, speedup = (c)/(a), "
                    "capture_overhead = time(c)/time(b) - 1, peak RSS and achieved FLOP/s of (c) against a "
                    "matmul peak measured in the same run.",
        epilog="The module docstring states the FLOP formula and what each variant does. "
               "Exit status 2 means (a) and (c) disagree beyond --atol.",
        formatter_class=HelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="tiny",
                   help="model shape, random weights: tiny (GPT-2 family, 2 layers x 4 heads, d=64, saved and "
                        "loaded in the release layout), gpt2 (GPT-2 124M: 12x12, d=768), llama "
                        "(LLaMA-3.2-1B: 16 layers x 32 query heads, 8 KV heads, d=2048)")
    p.add_argument("--n-problems", type=parse_n, default=32, metavar="N",
                   help="problems timed for (b) and (c): the seed-42 sample of N problems, or 'all' for the "
                        "whole file (7,473 for the train split)")
    p.add_argument("--reference-problems", type=int, default=None, metavar="K",
                   help="problems for the reference (a) and the (a)-vs-(c) check: the first K of the sample "
                        "(default: all N on CPU, 8 on CUDA)")
    p.add_argument("--batch-size", type=parse_batch_sizes, default="best", metavar="B[,B...]|best",
                   help="batch size of (b) and (c); a comma list is swept for (c) and the fastest is kept; "
                        f"'best' sweeps {SWEEP['cpu']} on CPU, {SWEEP['cuda']} on CUDA")
    p.add_argument("--max-new-tokens", type=int, default=8, metavar="G",
                   help="fixed greedy decode budget after EOT, the same for (a), (b) and (c)")
    p.add_argument("--shard-size", type=int, default=1024, metavar="S",
                   help="(c) calls the extractor on S problems at a time and keeps no attention from finished "
                        "shards, the way a whole-split run streams")
    p.add_argument("--repeats", type=int, default=1, metavar="R",
                   help="interleaved timed runs of (b) and (c) at the chosen batch size, after the sweep; the "
                        "fastest of each counts (the sweep's own (c) run included)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when present)")
    p.add_argument("--dtype", default="auto",
                   help="float32, bfloat16 or float16; auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads before anything runs (default: torch's own choice)")
    p.add_argument("--peak-size", type=int, default=None, metavar="N",
                   help="side of the square matmul timed for peak_gflops (default 2048 on CPU, 8192 on CUDA)")
    p.add_argument("--atol", type=float, default=None,
                   help="tolerance of the (a)-vs-(c) check (default 1e-3 in float32, 3e-2 otherwise); position or "
                        "padding bugs give differences of order 0.1")
    p.add_argument("--gsm8k", type=Path, default=DEFAULT_GSM8K, metavar="PATH",
                   help="GSM8K JSONL file (question/answer records)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the results here as JSON")
    p.add_argument("--check-dtype", default="float32",
                   help="dtype of the (a)-vs-(c) check: float32 (a float32 copy of the model when the run's dtype "
                        "differs; random weights amplify bf16 rounding through the latent loop far past any useful "
                        "tolerance) or 'same' (the run's dtype)")
    p.add_argument("--on-mismatch", choices=("fail", "warn"), default="fail",
                   help="when (a) and (c) differ beyond --atol: fail (exit 2 before timing (c)) or warn (record "
                        "agreement.ok = false, time everything, exit 2 at the end)")
    p.add_argument("--no-prepack", action="store_true",
                   help="keep PyTorch's default linear layers on CPU float32 instead of the oneDNN-prepacked "
                        "weights the library loads by default (for before/after comparisons)")
    p.add_argument("--skip-reference", action="store_true",
                   help="skip (a) and the check (speedup is then null): for whole-split memory/throughput runs")
    p.add_argument("--profile", action="store_true",
                   help="after the timed runs, run (c) once more under torch.profiler and report where its time "
                        "goes: prefill, thought steps, decode steps, LM head and the rest, each split into linear "
                        "layers, attention (with the cache writes) and other, with GFLOP/s and GB/s where they apply "
                        "(the profiler slows many small ops, on the tiny shape most: compare shares and rates, not "
                        "seconds)")
    return p


# ------------------------------------------------------------------------------------------ helpers
class Clock:
    """Wall-clock timing that waits for the device before reading the clock."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_seconds = 0.0  # process CPU time (all threads) of the last timed call

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object]) -> tuple[float, object]:
        self.sync()
        start, cpu = time.perf_counter(), time.process_time()
        out = fn()
        self.sync()
        self.cpu_seconds = time.process_time() - cpu
        return time.perf_counter() - start, out


class Memory:
    """Peak resident memory per phase (Linux VmHWM, reset through /proc/self/clear_refs) and CUDA peak."""

    def __init__(self, device: torch.device):
        self.device = device
        self.phases: dict[str, dict[str, float]] = {}

    @staticmethod
    def _status_mb(key: str) -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    @staticmethod
    def lifetime_peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def reset(self) -> bool:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            return True
        except OSError:
            return False

    @contextlib.contextmanager
    def phase(self, name: str):
        resettable = self.reset()
        try:
            yield
        finally:
            peak = self._status_mb("VmHWM") if resettable else None
            entry = {"peak_rss_mb": round(peak if peak is not None else self.lifetime_peak_mb(), 1)}
            if self.device.type == "cuda":
                entry["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
            old = self.phases.get(name)
            self.phases[name] = entry if old is None else {k: max(v, old.get(k, 0)) for k, v in entry.items()}


def best_time(clock: Clock, fn: Callable[[], object], repeats: int = 5) -> tuple[float, float]:
    """The shortest wall-clock and the shortest process-CPU seconds of `repeats` timed calls, after a warm-up call."""
    fn()
    wall = cpu = math.inf
    for _ in range(repeats):
        seconds, _ = clock.time(fn)
        wall, cpu = min(wall, seconds), min(cpu, clock.cpu_seconds)
    return wall, cpu


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, clock: Clock, n: int | None = None,
                       repeats: int = 5) -> tuple[float, float]:
    """Best rate of an n^3 matmul (default n = 2048 on CPU, 8192 on CUDA) in the run's dtype and threads:
    (GFLOP per wall-clock second, GFLOP per second of process CPU time summed over threads)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    wall, cpu = best_time(clock, lambda: torch.matmul(a, b), repeats)
    return 2 * n**3 / wall / 1e9, 2 * n**3 / max(cpu, 1e-9) / 1e9


def packed_peak_gflops(clock: Clock, n: int | None = None, repeats: int = 5) -> float:
    """Best wall-clock rate of the same n^3 product (default n = 2048) in CPU float32 through oneDNN's prepacked
    linear kernel, the one the prepacked decoder runs (codi_attn.prepack; call it where `can_prepack`). On the AMD
    EPYC it beats torch.matmul (MKL) by ~15%, so a fraction of the matmul peak alone flatters a machine whose MKL
    is slow."""
    n = n or 2048
    a, packed = torch.randn(n, n), torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, n))
    wall, _ = best_time(clock, lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""), repeats)
    return 2 * n**3 / wall / 1e9


def machine_info(device: torch.device) -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------------------------------ model
def build_model(shape: str, device: str, dtype: str, workdir: Path, prepack: bool = True):
    """A random-weight CODI model of the given shape (tiny goes through the release layout and the loader)."""
    from codi_attn.model import resolve_device_dtype

    dev, dt = resolve_device_dtype(device, dtype)
    if shape == "tiny":
        from codi_attn.fixtures import build_tiny_codi
        from codi_attn.model import load_codi

        # 1024 positions: the fixture tokenizer turns the longest GSM8K questions into ~580 tokens
        base, ckpt = build_tiny_codi(workdir / "tiny", "gpt2", seed=0, n_positions=1024)
        return load_codi("gpt2", base=str(base), ckpt=str(ckpt), device=str(dev), dtype=str(dt).split(".")[-1],
                         prepack=prepack)
    from codi_attn.fixtures import full_size_codi

    model = full_size_codi("gpt2" if shape == "gpt2" else "llama", dtype=dt, device=str(dev), prepack=prepack)
    rows = model.lm.get_input_embeddings().weight.shape[0]
    if (model.pad_id, model.bot_id, model.eot_id) != (rows - 3, rows - 2, rows - 1):  # codi-spec section 1
        raise SystemExit(f"{model.name}: pad/bot/eot ids {model.pad_id}/{model.bot_id}/{model.eot_id} do not match "
                         f"an embedding table of V+3 = {rows} rows")
    return model


def cast_model(model, dtype: torch.dtype):
    """A copy of the CODI model with weights in another dtype (for the check), the original left untouched."""
    import copy
    import dataclasses

    lm, prj = copy.deepcopy(model.lm).to(dtype), copy.deepcopy(model.prj).to(dtype)
    return dataclasses.replace(model, lm=lm, prj=prj, dtype=dtype)


def model_mb(model) -> float:
    tensors = {id(t): t for t in list(model.lm.parameters()) + list(model.lm.buffers()) + list(model.prj.parameters())}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def _decoder_layers(lm) -> torch.nn.ModuleList:
    body = lm.base_model
    for name in ("h", "layers"):
        if hasattr(body, name):
            return getattr(body, name)
    raise ValueError(f"cannot find the decoder layers of {type(body).__name__}")


def flop_terms(model) -> dict:
    """The config numbers the FLOP formula needs (see the module docstring)."""
    cfg = model.lm.config
    linear = sum(t.numel() for layer in _decoder_layers(model.lm)  # prepacked weights are buffers
                 for t in (*layer.parameters(), *layer.buffers()) if t.dim() == 2)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // model.n_heads
    prj = sum(p.numel() for p in model.prj.parameters() if p.dim() == 2)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or model.n_heads
    return {"linear_params": linear, "layers": model.n_layers, "d_q": model.n_heads * head_dim,
            "d_kv": kv_heads * head_dim, "d": cfg.hidden_size,
            "vocab_rows": model.lm.get_output_embeddings().weight.shape[0], "prj_params": prj}


def problem_flops(terms: dict, prompt: int, generated: int) -> float:
    """Useful forward FLOPs of one problem: prompt = T (question + BOT), generated = G (see the docstring)."""
    steps = N_THOUGHTS + 1 + max(generated - 1, 0)
    tokens = prompt + steps
    attention_keys = prompt * (prompt + 1) / 2 + steps * prompt + steps * (steps + 1) / 2
    return (2 * terms["linear_params"] * tokens
            + 4 * terms["layers"] * terms["d_q"] * attention_keys
            + N_THOUGHTS * 2 * terms["prj_params"]
            + generated * 2 * terms["d"] * terms["vocab_rows"])


def cache_kwarg(module: torch.nn.Module) -> str:
    """transformers 5.2x renamed past_key_values to cache; an unknown keyword would be swallowed silently."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


# ------------------------------------------------------------------------------ (a) the reference
@torch.inference_mode()
def reference_extract(model, token_ids: list[list[int]], max_new_tokens: int) -> dict:
    """Design-style extraction, one problem at a time (see the module docstring, variant (a))."""
    from transformers import DynamicCache

    from codi_attn.runner import decode_budget  # the same budget as (b) and (c): timings compare like with like

    lm, n_layers, n_heads = model.lm, model.n_layers, model.n_heads
    embed = lm.get_input_embeddings()
    n = len(token_ids)
    attention = np.zeros((n, n_layers, n_heads, N_THOUGHTS, N_THOUGHTS), np.float32)
    mass = np.zeros((n, n_layers, n_heads, N_THOUGHTS, 4), np.float32)
    generated = []
    kw = cache_kwarg(lm)
    before = lm.config._attn_implementation
    lm.set_attn_implementation("eager")
    try:
        for b, ids in enumerate(token_ids):
            q = len(ids) - 1  # question tokens; BOT sits at q, thought i at q + 1 + i
            cache = DynamicCache(config=lm.config)
            out = lm(input_ids=torch.tensor([ids], device=model.device), use_cache=True, output_attentions=True,
                     output_hidden_states=True, **{kw: cache})
            hidden = out.hidden_states[-1][:, -1]
            for i in range(N_THOUGHTS):
                z = model.prj(hidden)
                out = lm(inputs_embeds=z[:, None], use_cache=True, output_attentions=True,
                         output_hidden_states=True, **{kw: cache})
                if out.attentions is None or any(a is None for a in out.attentions):
                    raise RuntimeError("reference: eager attention returned no weights")
                for layer in range(n_layers):
                    for head in range(n_heads):
                        row = out.attentions[layer][0, head, -1].float().cpu().numpy()
                        attention[b, layer, head, i, : i + 1] = row[q + 1: q + 2 + i]
                        mass[b, layer, head, i] = (row[0], row[1:q].sum(), row[q], row[q + 1: q + 2 + i].sum())
                hidden = out.hidden_states[-1][:, -1]
            eot = embed(torch.tensor([[model.eot_id]], device=model.device))
            out = lm(inputs_embeds=eot, use_cache=True, output_attentions=True, output_hidden_states=True,
                     **{kw: cache})
            tokens = []
            budget = decode_budget(model, len(ids), max_new_tokens)
            for t in range(budget):
                logits = out.logits[:, -1].float()
                logits[:, model.eot_id] = -math.inf
                token = int(logits.argmax(-1))
                tokens.append(token)
                if token in model.stop_ids or t == budget - 1:
                    break
                out = lm(input_ids=torch.tensor([[token]], device=model.device), use_cache=True,
                         output_attentions=True, output_hidden_states=True, **{kw: cache})
            if cache.get_seq_length() != len(ids) + N_THOUGHTS + len(tokens):
                raise RuntimeError("reference: the KV cache was not used (wrong keyword for this transformers?)")
            generated.append(tokens)
    finally:
        lm.set_attn_implementation(before)
    return {"attention": attention, "mass": mass, "generated": generated}


# ---------------------------------------------------------------------------------- (b) plain
@torch.inference_mode()
def plain_inference(model, questions: list[str], batch_size: int, max_new_tokens: int) -> list[list[int]]:
    """(b): the runner (`codi_attn.runner.Runner`) with no hooks: the extractor's batches, prefill groups, cache
    and decoding without the capture; returns each problem's generated ids up to and including its stop token."""
    from codi_attn.runner import Runner

    tokens = Runner(model, batch_size, max_new_tokens).run(questions).tokens
    return [[t for t in row if t >= 0] for row in tokens.tolist()]


# ---------------------------------------------------------------------------------- (c) project
def project_extract(model, questions: list[str], batch_size: int, max_new_tokens: int, shard_size: int,
                    keep: int = 0) -> dict:
    """(c): codi_attn.extract.extract shard by shard; keeps the attention/mass of the first `keep` problems only."""
    from codi_attn.extract import extract

    kept_attention, kept_mass, checked = [], [], 0
    for start in range(0, len(questions), shard_size):
        ex = extract(model, questions[start: start + shard_size], batch_size=batch_size,
                     max_new_tokens=max_new_tokens)
        if not np.isfinite(ex.attention).all():
            raise RuntimeError(f"extractor returned non-finite attention in the shard at {start}")
        take = max(0, min(keep - start, len(ex.attention)))
        if take:
            kept_attention.append(ex.attention[:take].copy())
            kept_mass.append(ex.mass[:take].copy())
        checked += len(ex.attention)
        del ex
    cat = (lambda xs: np.concatenate(xs) if xs else np.zeros((0,)))
    return {"attention": cat(kept_attention), "mass": cat(kept_mass), "n": checked}


# ------------------------------------------------------------------------------------------- profile
PHASES = ("prefill", "thoughts", "decode", "lm head", "rest")  # rest: all else (capture, prj's glue, argmax, ...)
PARTS = ("linear", "attention", "other")
LINEAR_OPS = frozenset({"mkldnn::_linear_pointwise", "aten::linear", "aten::addmm"})  # prepacked, Linear, Conv1D
RANGE = "codi::"


@contextlib.contextmanager
def profiler_ranges(model):
    """Label the runner's work for torch.profiler: codi::<phase> around each prefill, thought and decode forward
    (the thoughts' prj included) and the LM head, codi::attention around every layer's attention module."""
    from torch.profiler import record_function

    from codi_attn.runner import PaddedBatch, layer_module

    prefill, forward, opened, handles = PaddedBatch.prefill, PaddedBatch.forward, [], []

    def labelled_prefill(self, *args, **kwargs):
        with record_function(RANGE + "prefill"):
            return prefill(self, *args, **kwargs)

    def labelled_forward(self, embeds, phase):
        with record_function(RANGE + ("thoughts" if phase.startswith("thought") else "decode")):
            return forward(self, embeds, phase)

    modules = [(model.lm.get_output_embeddings(), "lm head"), (model.prj, "thoughts"),
               *((layer_module(model, "attn", layer), "attention") for layer in range(model.n_layers))]
    for module, name in modules:
        handles.append(module.register_forward_pre_hook(
            lambda m, args, name=name: opened.append(record_function(RANGE + name).__enter__())))
        handles.append(module.register_forward_hook(lambda m, args, out: opened.pop().__exit__(None, None, None)))
    PaddedBatch.prefill, PaddedBatch.forward = labelled_prefill, labelled_forward
    try:
        yield
    finally:
        PaddedBatch.prefill, PaddedBatch.forward = prefill, forward
        for handle in handles:
            handle.remove()


def classify(event) -> tuple[str, str]:
    """(phase, part) of one profiler event: its nearest enclosing codi:: phase (rest outside them); linear if it
    is or runs inside a linear kernel, attention if inside an attention module, other otherwise."""
    chain = []
    while event is not None:
        chain.append(event.name)
        event = event.cpu_parent
    phase = next((name[len(RANGE):] for name in chain if name[len(RANGE):] in PHASES), "rest")
    part = ("linear" if LINEAR_OPS.intersection(chain) else
            "attention" if RANGE + "attention" in chain else "other")
    return phase, part


def phase_work(terms: dict, prompt: Sequence[int], generated: Sequence[int], batches: int,
               bytes_per_value: int) -> dict[tuple[str, str], dict[str, float]]:
    """Useful GFLOP per (phase, part), the terms of problem_flops split by phase, and for the one-position steps the
    GB they must read: the decoder's linear weights once per forward of a batch (each batch taken to decode as far as
    the longest row), each row's visible keys and values once per step (d_kv = key/value heads x head dim). The
    GFLOP sum to problem_flops over the problems (G >= 1: the EOT forward is decode step 1)."""
    p, layers, d_q, d_kv = terms["linear_params"], terms["layers"], terms["d_q"], terms["d_kv"]
    work: dict[tuple[str, str], dict[str, float]] = {}

    def add(phase: str, part: str, flops: float, gb: float = 0.0) -> None:
        entry = work.setdefault((phase, part), {"gflop": 0.0, "gb": 0.0})
        entry["gflop"] += flops / 1e9
        entry["gb"] += gb / 1e9

    for t, g in zip(prompt, generated):
        add("prefill", "linear", 2 * p * t)
        add("prefill", "attention", 4 * layers * d_q * t * (t + 1) / 2)
        add("thoughts", "linear", 2 * p * N_THOUGHTS + N_THOUGHTS * 2 * terms["prj_params"])
        for phase, steps in (("thoughts", range(1, N_THOUGHTS + 1)),
                             ("decode", range(N_THOUGHTS + 1, N_THOUGHTS + g + 1))):
            keys = sum(t + k for k in steps)
            add(phase, "attention", 4 * layers * d_q * keys, 2 * layers * d_kv * keys * bytes_per_value)
        add("decode", "linear", 2 * p * g)
        add("lm head", "linear", g * 2 * terms["d"] * terms["vocab_rows"])
    longest = max(generated, default=0)
    add("thoughts", "linear", 0, batches * N_THOUGHTS * p * bytes_per_value)
    add("decode", "linear", 0, batches * longest * p * bytes_per_value)
    return work


def profile_project(model, questions: list[str], batch_size: int, max_new_tokens: int, shard_size: int,
                    work: dict, peak_gflops: float) -> dict:
    """(c) once more under torch.profiler: seconds, share, GFLOP/s (and % of the peak) and GB/s per phase and part;
    the parts' seconds sum to the profiled run's (every op's self time counted once)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profiler_ranges(model), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        with record_function(RANGE + "rest"):
            project_extract(model, questions, batch_size, max_new_tokens, shard_size)
        wall = time.perf_counter() - start
    seconds: dict[tuple[str, str], float] = {}
    for event in prof.events():
        key = classify(event)
        seconds[key] = seconds.get(key, 0.0) + event.self_cpu_time_total / 1e6
    total = sum(seconds.values())
    rows = []
    for phase in PHASES:
        for part in PARTS:
            s = seconds.get((phase, part), 0.0)
            w = work.get((phase, part), {"gflop": 0.0, "gb": 0.0})
            if not s and not w["gflop"]:
                continue
            rate = w["gflop"] / s if s and w["gflop"] else None
            rows.append({"phase": phase, "part": part, "seconds": round(s, 4), "share": s / total,
                         "gflop": w["gflop"], "gflops": rate,
                         "fraction_of_peak": rate / peak_gflops if rate else None,
                         "gb_per_s": w["gb"] / s if s and w["gb"] else None})
    return {"wall_s": wall, "events_s": total, "rows": rows}


def profile_lines(profile: dict) -> list[str]:
    """The profile as a table for the summary."""
    lines = [f"  profile of one more (c) run: {profile['wall_s']:.2f} s under the profiler "
             "(phase / part: seconds, share, GFLOP/s and % of peak, GB/s)"]
    for r in profile["rows"]:
        rate = "" if r["gflops"] is None else f"{r['gflops']:8.1f} GFLOP/s ({r['fraction_of_peak']:.0%})"
        gb = "" if r["gb_per_s"] is None else f"  {r['gb_per_s']:5.1f} GB/s"
        lines.append(f"    {r['phase']:<9} {r['part']:<10} {r['seconds']:7.3f} s {r['share']:6.1%}  {rate}{gb}")
    return lines


# ------------------------------------------------------------------------------------------- run
def padding_efficiency(lengths: Sequence[int], batch_size: int, shard_size: int) -> float:
    """Real prompt tokens / padded prompt tokens when each shard is length-sorted and cut into batches."""
    real = padded = 0
    for start in range(0, len(lengths), shard_size):
        shard = sorted(lengths[start: start + shard_size])
        for b in range(0, len(shard), batch_size):
            chunk = shard[b: b + batch_size]
            real, padded = real + sum(chunk), padded + max(chunk) * len(chunk)
    return real / padded if padded else 1.0


def load_questions(path: Path, n: int | None) -> list[str]:
    from codi_attn.data import load_records, sample_problems

    from codi_attn.data import DatasetError

    try:
        records = load_records(str(path), "train")
    except DatasetError as e:
        raise SystemExit(f"--gsm8k: {e}") from None
    if n is not None and n > len(records):
        raise SystemExit(f"--n-problems {n} is larger than {path}, which holds {len(records)} problems")
    return [p.question for p in sample_problems(records, n, seed=42, split="train")]


def agreement(ref: dict, proj: dict, atol: float) -> dict:
    k = len(ref["attention"])
    att = float(np.abs(ref["attention"] - proj["attention"][:k]).max()) if k else 0.0
    mas = float(np.abs(ref["mass"] - proj["mass"][:k]).max()) if k else 0.0
    return {"n_compared": k, "atol": atol, "max_abs_diff_attention": att, "max_abs_diff_mass": mas,
            "ok": bool(k > 0 and att <= atol and mas <= atol)}


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    from codi_attn.runner import tokenize_questions
    from codi_attn.model import resolve_device_dtype
    from codi_attn.prepack import can_prepack

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    clock, memory = Clock(device), Memory(device)
    sizes = args.batch_size or list(SWEEP["cuda" if device.type == "cuda" else "cpu"])
    check_dtype = dtype if args.check_dtype == "same" else resolve_device_dtype(str(device), args.check_dtype)[1]
    if check_dtype != dtype and can_prepack(device, dtype) and not args.no_prepack:
        raise SystemExit(f"--check-dtype {args.check_dtype} needs a {str(check_dtype).split('.')[-1]} copy of the "
                         "model, but its prepacked linear weights cannot be cast: add --no-prepack, or use "
                         "--check-dtype same")
    atol = args.atol if args.atol is not None else (1e-3 if check_dtype == torch.float32 else 3e-2)
    load_start = load_avg()
    log = (lambda msg: print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True))

    questions = load_questions(args.gsm8k, args.n_problems)
    n = len(questions)
    n_ref = 0 if args.skip_reference else min(n, args.reference_problems if args.reference_problems is not None
                                                 else (8 if device.type == "cuda" else n))
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp, memory.phase("load"):
        t_load, model = clock.time(lambda: build_model(args.shape, str(device), str(dtype).split(".")[-1], Path(tmp),
                                                          prepack=not args.no_prepack))
    log(f"{args.shape} model on {device} {dtype}: {model_mb(model):.0f} MB, built in {t_load:.1f} s")
    token_ids = tokenize_questions(model, questions)
    prompt = np.array([len(t) for t in token_ids])
    terms = flop_terms(model)

    peak_before, peak_cpu_before = matmul_peak_gflops(device, dtype, clock, args.peak_size)
    packs = can_prepack(device, dtype) and not args.no_prepack  # then also the yardstick of the decoder's own kernel
    packed_before = packed_peak_gflops(clock, args.peak_size) if packs else None
    log(f"matmul peak {peak_before:.1f} GFLOP/s ({torch.get_num_threads()} threads)"
        + (f", oneDNN-packed {packed_before:.1f}" if packs else ""))

    # warm-up: first calls pay one-time costs (allocator, kernels, lazy imports)
    warm = questions[: min(2, n)]
    reference_extract(model, token_ids[: min(1, n)], 2)
    plain_inference(model, warm, 2, 2)
    project_extract(model, warm, 2, 2, args.shard_size)

    result: dict = {"shape": args.shape, "device": str(device), "dtype": str(dtype).split(".")[-1],
                    "n_problems": n, "reference_problems": n_ref, "max_new_tokens": args.max_new_tokens,
                    "shard_size": args.shard_size, "repeats": args.repeats, "model_name": model.name,
                    "model_mb": round(model_mb(model), 1), "model_build_s": round(t_load, 2),
                    "linear": model.source.get("linear"),
                    "prompt_tokens_mean": float(prompt.mean()), "prompt_tokens_max": int(prompt.max()),
                    "gsm8k": str(args.gsm8k), "codi_attn": str(Path(sys.modules["codi_attn"].__file__).parent)}

    # (a) the reference, then the (a)-vs-(c) check, before (c) is timed
    ref = None
    if n_ref:
        with memory.phase("reference"):
            t_ref, ref = clock.time(lambda: reference_extract(model, token_ids[:n_ref], args.max_new_tokens))
        result["reference_problems_per_s"] = n_ref / t_ref
        result["reference_seconds"] = t_ref
        result["reference_cpu_seconds"] = clock.cpu_seconds
        result["reference_prompt_tokens_mean"] = float(prompt[:n_ref].mean())
        log(f"(a) reference: {n_ref} problems in {t_ref:.2f} s ({n_ref / t_ref:.3f}/s)")
        # the check runs the reference problems inside a batch of others (padding, sorting, batching all active),
        # in --check-dtype: random weights amplify bf16 rounding through the six-step latent loop (codi-spec 3)
        with memory.phase("check"):
            check_model, check_ref = model, ref
            if check_dtype != dtype:
                check_model = cast_model(model, check_dtype)
                check_ref = reference_extract(check_model, token_ids[:n_ref], args.max_new_tokens)
            check_n, check_bs = min(n, max(n_ref, max(sizes))), max(sizes)
            proj = project_extract(check_model, questions[:check_n], check_bs, args.max_new_tokens, args.shard_size,
                                   keep=n_ref)
            del check_model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result["agreement"] = {**agreement(check_ref, proj, atol), "dtype": str(check_dtype).split(".")[-1],
                               "batch_size": check_bs}
        log(f"(a) vs (c) check in {result['agreement']['dtype']} on {n_ref} problems in a batch of {check_bs}: "
            f"max |diff| attention {result['agreement']['max_abs_diff_attention']:.2e}, "
            f"mass {result['agreement']['max_abs_diff_mass']:.2e} (atol {atol:g})")
        if not result["agreement"]["ok"]:
            result["error"] = "reference (a) and project (c) attention differ beyond atol"
            if args.on_mismatch == "fail":
                return result
            log(f"WARNING: {result['error']}; timing anyway (--on-mismatch warn)")

    # (c) at each batch size; the fastest is kept
    def timed(phase: str, fn: Callable[[], object]) -> tuple[float, float, object]:
        with memory.phase(phase):
            wall, out = clock.time(fn)
        return wall, clock.cpu_seconds, out

    sweep: dict[int, tuple[float, float]] = {}
    kept = {}
    for bs in sizes:
        wall, cpu, kept[bs] = timed("project", lambda: project_extract(model, questions, bs, args.max_new_tokens,
                                                                       args.shard_size, keep=n_ref))
        sweep[bs] = (wall, cpu)
        log(f"(c) project, batch {bs}: {n} problems in {wall:.2f} s ({n / wall:.3f}/s)")
    best = min(sweep, key=lambda k: sweep[k][0])
    # (b) and (c) interleaved at the chosen batch size, (c) again after the sweep: the sweep's run at a batch size
    # is the first to meet its shapes, and oneDNN builds a kernel per new shape (bf16 on AMX: 5.2 s cold, 3.0 s
    # warm for 48 GPT-2-shape problems, which read as a +55% capture overhead when only the sweep timed (c))
    runs_c, runs_b, generated = [sweep[best]], [], None
    for _ in range(args.repeats):
        wall, cpu, generated = timed("plain", lambda: plain_inference(model, questions, best, args.max_new_tokens))
        runs_b.append((wall, cpu))
        log(f"(b) plain, batch {best}: {n} problems in {wall:.2f} s ({n / wall:.3f}/s)")
        wall, cpu, _ = timed("project", lambda: project_extract(model, questions, best, args.max_new_tokens,
                                                                args.shard_size))
        runs_c.append((wall, cpu))
        log(f"(c) project, batch {best}: {n} problems in {wall:.2f} s ({n / wall:.3f}/s)")
    (t_c, cpu_c), (t_b, cpu_b) = min(runs_c), min(runs_b)
    if ref is not None and check_dtype != dtype:  # for information: (a) vs (c) in the run's own dtype
        info = agreement(ref, kept[best], atol)
        result["agreement_run_dtype"] = {k: info[k] for k in ("n_compared", "max_abs_diff_attention",
                                                               "max_abs_diff_mass")}
    if ref is not None:  # sanity of (b): greedy tokens equal the reference's (random weights may tie rarely)
        same = [g == r for g, r in zip(generated[:n_ref], ref["generated"])]
        result["plain_tokens_match_reference"] = sum(same) / len(same)

    peak_after, peak_cpu_after = matmul_peak_gflops(device, dtype, clock, args.peak_size)
    peak, peak_cpu = max(peak_before, peak_after), max(peak_cpu_before, peak_cpu_after)
    packed = max(packed_before, packed_peak_gflops(clock, args.peak_size)) if packs else None
    gen_counts = np.array([len(g) for g in generated])
    flops = sum(problem_flops(terms, int(p), int(g)) for p, g in zip(prompt, gen_counts))
    result.update({
        "plain_problems_per_s": n / t_b, "project_problems_per_s": n / t_c,
        "speedup": (n / t_c) / result["reference_problems_per_s"] if ref is not None else None,
        "capture_overhead": t_c / t_b - 1,
        "batch_size": best, "sweep_problems_per_s": {str(k): n / v[0] for k, v in sweep.items()},
        "project_seconds": t_c, "plain_seconds": t_b,
        "project_seconds_all": [w for w, _ in runs_c], "plain_seconds_all": [w for w, _ in runs_b],
        "project_cpu_seconds": cpu_c, "plain_cpu_seconds": cpu_b,
        # process CPU time: with --threads 1 on a shared machine, time spent waiting for a core is left out
        "speedup_cpu_time": (result["reference_cpu_seconds"] / n_ref) / (cpu_c / n) if ref is not None else None,
        "capture_overhead_cpu_time": cpu_c / cpu_b - 1,
        "achieved_gflops_cpu_time": flops / cpu_c / 1e9,  # GFLOP per CPU-second (all threads summed)
        "peak_gflops_cpu_time": peak_cpu,
        "achieved_fraction_of_peak_cpu_time": flops / cpu_c / 1e9 / peak_cpu,
        "prefill_padding_efficiency": padding_efficiency(prompt.tolist(), best, args.shard_size),
        "generated_tokens_mean": float(gen_counts.mean()), "flops_per_problem_mean": flops / n,
        "flop_terms": terms, "achieved_gflops": flops / t_c / 1e9, "plain_achieved_gflops": flops / t_b / 1e9,
        "peak_gflops": peak, "peak_gflops_before_after": [peak_before, peak_after],
        "packed_peak_gflops": packed,
        "achieved_fraction_of_packed_peak": flops / t_c / 1e9 / max(packed, peak) if packed else None,
        "achieved_fraction_of_peak": flops / t_c / 1e9 / peak,
        "whole_train_split_estimate_s": 7473 / (n / t_c),
    })
    if args.profile:
        batches = sum(-(-min(args.shard_size, n - s) // best) for s in range(0, n, args.shard_size))
        work = phase_work(terms, prompt.tolist(), gen_counts.tolist(), batches, torch.finfo(dtype).bits // 8)
        result["profile"] = profile_project(model, questions, best, args.max_new_tokens, args.shard_size, work, peak)
        log(f"profiled (c) run: {result['profile']['wall_s']:.2f} s")
    result["memory"] = memory.phases
    result["peak_rss_mb"] = round(max([Memory.lifetime_peak_mb()] + [p["peak_rss_mb"] for p in memory.phases.values()]),
                                  1)
    project_rss = memory.phases.get("project", {}).get("peak_rss_mb")
    result["project_peak_rss_mb"] = project_rss
    if device.type == "cuda":
        result["project_cuda_peak_mb"] = memory.phases.get("project", {}).get("cuda_peak_mb")
        result["memory_bound_ok"] = result["project_cuda_peak_mb"] < result["model_mb"] + 4096
    else:
        result["memory_bound_ok"] = project_rss is not None and project_rss < result["model_mb"] + 4096
    result["load_avg_start_end"] = [load_start, load_avg()]
    return result


def summary(res: dict) -> str:
    f = (lambda key, fmt="{:.3f}": "n/a" if res.get(key) is None else fmt.format(res[key]))
    lines = [
        f"shape {res['shape']} on {res['device']} ({res['machine'].get('gpu') or res['machine']['cpu']}, "
        f"{res['machine']['torch_threads']} threads), {res['dtype']}, {res['n_problems']} problems "
        f"(reference {res['reference_problems']}), decode budget {res['max_new_tokens']}, "
        f"prompt {res['prompt_tokens_mean']:.0f} tokens mean",
        f"  (a) reference        {f('reference_problems_per_s')} problems/s",
        f"  (b) plain            {f('plain_problems_per_s')} problems/s",
        f"  (c) project (bs {res.get('batch_size')}) {f('project_problems_per_s')} problems/s",
        f"  speedup (c)/(a)      {f('speedup', '{:.2f}')}",
        f"  capture_overhead     {f('capture_overhead', '{:+.3f}')}",
        f"  achieved / peak      {f('achieved_gflops', '{:.1f}')} / {f('peak_gflops', '{:.1f}')} GFLOP/s "
        f"({f('achieved_fraction_of_peak', '{:.0%}')}); against the better of it and the oneDNN-packed product "
        f"{f('packed_peak_gflops', '{:.1f}')} GFLOP/s: {f('achieved_fraction_of_packed_peak', '{:.0%}')}",
        f"  peak RSS             {f('peak_rss_mb', '{:.0f}')} MB (model {res['model_mb']:.0f} MB; (c) phase "
        f"{f('project_peak_rss_mb', '{:.0f}')} MB)" + (f"; CUDA (c) peak {res['project_cuda_peak_mb']:.0f} MB"
                                                       if res.get("project_cuda_peak_mb") else ""),
        f"  by CPU time          speedup {f('speedup_cpu_time', '{:.2f}')}, capture_overhead "
        f"{f('capture_overhead_cpu_time', '{:+.3f}')}, achieved / peak {f('achieved_gflops_cpu_time', '{:.1f}')} / "
        f"{f('peak_gflops_cpu_time', '{:.1f}')} GFLOP per CPU-second "
        f"({f('achieved_fraction_of_peak_cpu_time', '{:.0%}')})",
        f"  load average start/end {res.get('load_avg_start_end')}",
    ]
    if "profile" in res:
        lines += profile_lines(res["profile"])
    if "agreement" in res:
        a = res["agreement"]
        lines.append(f"  check (a) vs (c)     {'ok' if a['ok'] else 'MISMATCH'}: max |diff| attention "
                     f"{a['max_abs_diff_attention']:.1e}, mass {a['max_abs_diff_mass']:.1e} on {a['n_compared']} "
                     f"problems (atol {a['atol']:g})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1 or args.shard_size < 1 or args.repeats < 1:
        raise SystemExit("--max-new-tokens, --shard-size and --repeats must be at least 1")
    started, threads = time.time(), torch.get_num_threads()
    try:
        result = run(args)
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests)
    result["machine"] = machine_info(torch.device(result["device"]))
    result["machine"]["torch_threads"] = args.threads or threads
    result["timestamp"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result["bench_seconds"] = round(time.time() - started, 1)
    result["command"] = " ".join(["python", "benchmarks/bench_extract.py",
                                  *(argv if argv is not None else sys.argv[1:])])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=float) + "\n")
    if "project_problems_per_s" in result:
        print(summary(result))
    if "error" in result:
        print(f"bench_extract: {result['error']}: {result['agreement']}", file=sys.stderr)
        return EXIT_MISMATCH
    return 0


if __name__ == "__main__":
    sys.exit(main())
