"""AttentionFlow: how the six continuous thoughts of a CODI model attend to each other, head by head.

    python flows/attention_flow.py run                       # offline demo model
    python flows/attention_flow.py run --model llama --dataset ../shared/data/gsm8k/train.jsonl
    python flows/attention_flow.py resume                    # rerun only the shards that died
    python flows/attention_flow.py run --with kubernetes     # shards on GPUs (@resources below)
"""
from __future__ import annotations

import os
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from metaflow import FlowMutator, FlowSpec, Parameter, card, current, resources, step
from metaflow.exception import MetaflowException

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "codi_attn").is_dir() and str(ROOT) not in sys.path:  # a checkout: codi_attn/ and cards/ beside flows/
    sys.path.insert(0, str(ROOT))  # (in a remote task's code package they sit beside this file instead)

DEMO_DATASET = "synthetic"

# Test hooks, read only by the tests (tests/test_flow.py); a normal run never sets them.
#   CODI_ATTN_FAIL_SHARD=K       shard K raises after its first batch (K:kill = SIGKILLs itself instead)
#   CODI_ATTN_FAIL_PROBLEMS=a,b  these problem ids raise inside extraction
FAIL_SHARD_ENV = "CODI_ATTN_FAIL_SHARD"
FAIL_PROBLEMS_ENV = "CODI_ATTN_FAIL_PROBLEMS"


# ---------------------------------------------------------------------------------------------
# Plumbing that the steps call: settings, sharded extraction, the join's merge and summary.
# ---------------------------------------------------------------------------------------------

class SettingsError(ValueError):
    """A parameter of the run that cannot work; raised in start, before any shard runs."""


class InvalidRun(MetaflowException):
    """Shown by Metaflow as headline + message, without a traceback."""

    headline = "AttentionFlow cannot start"


def resolve_dataset(dataset: str, model: str, ckpt: str, base: str) -> str:
    """'auto' = the bundled synthetic set for the demo model, the hub's gsm8k for the others."""
    if dataset != "auto":
        return dataset
    return DEMO_DATASET if model == "demo" and not (ckpt or base) else "gsm8k"


def check_settings(p: dict) -> dict:
    """Validate every parameter cheaply (nothing is loaded but the dataset records) and return the
    settings the run uses, plus n (None = whole split) and n_records. Every problem found is
    reported at once, one line each naming the parameter, in a SettingsError."""
    from codi_attn.data import load_records, resolve_n
    from codi_attn.model import resolve_device_dtype, resolve_sources
    from codi_attn.presets import PRESETS

    errors, out = [], {**p, "dataset": resolve_dataset(p["dataset"], p["model"], p["ckpt"], p["base"])}

    def check(what: str, fn):
        try:
            return fn()
        except (ValueError, RuntimeError) as e:  # DatasetError, CODILoadError, torch's bad device string
            errors.append(f"{what}: {e}")

    for name in ("shard_size", "batch_size", "max_new_tokens"):
        if p[name] <= 0:
            errors.append(f"--{name} must be a positive integer, got {p[name]}")
    if p["n_boot"] < 0:
        errors.append(f"--n_boot must be 0 or more, got {p['n_boot']}")
    if not 0.0 <= p["max_failed_fraction"] <= 1.0:
        errors.append(f"--max_failed_fraction must be between 0 and 1, got {p['max_failed_fraction']}")
    check("--dtype", lambda: resolve_device_dtype("cpu", p["dtype"]))
    if p["device"] != "auto":
        import torch

        check("--device", lambda: torch.device(p["device"]))
    if p["model"] not in PRESETS:
        errors.append(f"--model: unknown preset {p['model']!r}; choose one of: {', '.join(PRESETS)}")
    else:
        sources = check("--model/--ckpt/--base", lambda: resolve_sources(p["model"], p["ckpt"] or None,
                                                                          p["base"] or None))
        out["base"], out["ckpt"] = sources or (p["base"], p["ckpt"])
    if p["compare_with"]:
        check("--compare_with", lambda: named_runs(current.flow_name or "AttentionFlow", p["compare_with"]))
    records = check("--dataset", lambda: load_records(out["dataset"], p["split"]))
    if records is not None:
        out["n"] = check("--n_problems", lambda: resolve_n(p["n_problems"], len(records)))
        out["n_records"] = len(records)
    if errors:
        raise SettingsError("\n".join(errors))
    return out


MAX_NUM_SPLITS = 100  # Metaflow's default --max-num-splits: a foreach wider than this stops the run


def shard_note(n_problems: int, shard_size: int) -> str | None:
    """A warning when the extract foreach would be wider than Metaflow's default limit."""
    n_shards = -(-n_problems // shard_size)
    if n_shards <= MAX_NUM_SPLITS:
        return None
    return (f"{n_problems} problems in shards of {shard_size} make {n_shards} extract tasks, more than Metaflow's "
            f"default limit of {MAX_NUM_SPLITS}: the run stops after sample unless it was started as "
            f"`run --max-num-splits {n_shards} ...` or with --shard_size {-(-n_problems // MAX_NUM_SPLITS)} or more.")


def _fail_hook(shard_index: int) -> None:
    """Test hook: die the way a shard task can die (exception or SIGKILL) when asked to."""
    spec = os.environ.get(FAIL_SHARD_ENV, "")
    if not spec:
        return
    index, _, how = spec.partition(":")
    if int(index) != shard_index:
        return
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"test hook {FAIL_SHARD_ENV}={spec}: shard {shard_index} fails on purpose")


def extract_shard(model, problems: list[dict], batch_size: int, max_new_tokens: int, on_batch=None,
                  shard_index: int = 0) -> dict:
    """Extract the problems of one shard in batches. A batch that raises is retried problem by problem,
    so one bad problem costs only itself; each failure is recorded as {'id', 'error'}.

    Returns ids, attention float16 [n, L, H, 6, 6], mass float16 [n, L, H, 6, 4], texts, predictions
    float64 [n], correct bool [n] for the n problems that succeeded (in input order), and failed.
    """
    import numpy as np

    from codi_attn.extract import MASS_PARTS, N_LATENTS, extract

    fail_ids = set(filter(None, os.environ.get(FAIL_PROBLEMS_ENV, "").split(",")))

    def run(chunk):
        bad = [problems[k]["id"] for k in chunk if problems[k]["id"] in fail_ids]
        if bad:
            raise RuntimeError(f"test hook {FAIL_PROBLEMS_ENV}: {bad[0]} fails on purpose")
        return extract(model, [problems[k]["question"] for k in chunk], [problems[k]["solution"] for k in chunk],
                       batch_size=len(chunk), max_new_tokens=max_new_tokens)

    n, shape = len(problems), (model.n_layers, model.n_heads, N_LATENTS)
    attention = np.zeros((n, *shape, N_LATENTS), np.float16)
    mass = np.zeros((n, *shape, len(MASS_PARTS)), np.float16)
    texts, predictions = [""] * n, np.full(n, np.nan)
    correct, ok = np.zeros(n, bool), np.zeros(n, bool)
    failed = []
    for start in range(0, n, batch_size):
        chunk = list(range(start, min(n, start + batch_size)))
        try:
            results = [(chunk, run(chunk))]
        except Exception:  # find the problem(s) to blame, keep the others
            results = []
            for k in chunk:
                try:
                    results.append(([k], run([k])))
                except Exception as e:
                    failed.append({"id": problems[k]["id"], "error": f"{type(e).__name__}: {e}"})
        for idx, ex in results:
            attention[idx], mass[idx] = ex.attention, ex.mass
            predictions[idx], correct[idx], ok[idx] = ex.prediction, ex.correct, True
            for k, text in zip(idx, ex.text):
                texts[k] = text
        if on_batch is not None:
            on_batch(chunk[-1] + 1, len(failed))
        if start == 0:
            _fail_hook(shard_index)
    return {"ids": [p["id"] for p, good in zip(problems, ok) if good],
            "attention": attention[ok], "mass": mass[ok], "texts": [t for t, good in zip(texts, ok) if good],
            "predictions": predictions[ok], "correct": correct[ok], "failed": failed}


def check_failures(failed: list[dict], n: int, max_fraction: float, shard_index: int) -> None:
    """Fail the shard when more than max_fraction of its n problems raised."""
    if len(failed) > max_fraction * n:
        raise RuntimeError(f"shard {shard_index}: {len(failed)} of {n} problems failed, more than "
                           f"--max_failed_fraction={max_fraction}; first: {failed[0]['id']}: {failed[0]['error']}")


def merge_shards(sampled_ids: list[str], shards: list[dict]) -> dict:
    """Concatenate shard results in sample order; every sampled id must come back exactly once,
    either extracted or failed, and no other id may appear."""
    import numpy as np

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
        raise RuntimeError(f"no problem was extracted ({len(failed)} failed); first error: {failed[0]['error']}")
    return {"ids": ids,
            "attention": np.stack(gather("attention")).astype(np.float16),
            "mass": np.stack(gather("mass")).astype(np.float16),
            "texts": gather("texts"), "predictions": np.array(gather("predictions"), np.float64),
            "correct": np.array(gather("correct"), bool), "failed": failed}


def attention_stats(attention, mass, mass_parts) -> dict:
    """Where the latent queries' attention goes, on raw weights, over all problems, layers and heads.

    incoming[j] is codi_attn.metrics.incoming of the mean matrix (mean weight thought j gets from the
    thoughts i >= j + 2; nan for z5, z6), incoming_baseline[j] the same under causal-uniform attention
    with the same row masses (codi-spec trap 7), incoming_lift their ratio. Per-head hubs with
    intervals are the metrics step's business; these are the run's overall numbers.
    """
    import numpy as np

    from codi_attn.metrics import baseline_of, incoming

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


def named_runs(flow_name: str, compare_with: str) -> list:
    """The finished runs named in compare_with (run ids or pathspecs, comma separated); ValueError
    naming the first that is missing or unfinished."""
    from metaflow import Run, namespace
    from metaflow.exception import MetaflowNotFound

    namespace(None)
    runs = []
    for name in filter(None, (s.strip() for s in compare_with.split(","))):
        pathspec = name if "/" in name else f"{flow_name}/{name}"
        try:
            run = Run(pathspec)
        except MetaflowNotFound:
            raise ValueError(f"run {pathspec} not found in this datastore") from None
        if not run.successful:
            raise ValueError(f"run {pathspec} did not finish (resume it first)")
        runs.append(run)
    return runs


def find_comparison_runs(flow_name: str, this_run_id: str, model: str, fingerprint: str,
                         compare_with: str = "") -> list:
    """Runs to compare with: those named in compare_with (run ids or pathspecs, comma separated),
    else the latest successful run of every other model on the same dataset fingerprint."""
    from metaflow import Flow, namespace

    if compare_with:
        return named_runs(flow_name, compare_with)
    namespace(None)
    latest = {}
    for run in Flow(flow_name).runs(f"dataset:{fingerprint[:12]}"):
        if run.id == this_run_id or not run.successful:
            continue
        other = next((t.split(":", 1)[1] for t in run.tags if t.startswith("model:")), None)
        if other is None or other == model or other in latest:
            continue
        if run.data.dataset_fingerprint == fingerprint:
            latest[other] = run
    return list(latest.values())


# ---------------------------------------------------------------------------------------------
# The flow
# ---------------------------------------------------------------------------------------------

class ship_project_code(FlowMutator):
    """Put codi_attn/ and cards/ into the code package beside this file, so that tasks run remotely
    (--with kubernetes, --with batch) import them without installing codi-attn in the image."""

    def add_to_package(self):
        from metaflow.packaging_sys import ContentType

        for package in ("codi_attn", "cards"):  # code, and the demo model's files under codi_attn/
            for path in sorted((ROOT / package).rglob("*")):
                if path.is_file() and path.suffix != ".pyc" and "__pycache__" not in path.parts:
                    yield str(path), str(path.relative_to(ROOT)), ContentType.USER_CONTENT


@ship_project_code
class AttentionFlow(FlowSpec):
    """Per-head attention between the six continuous thoughts of a CODI model.

    Steps:
      start      validate every parameter (model source, dataset, sizes) before any work
      sample     the seed-42 problem sample of the design (codi-spec section 6), split into shards
      extract    foreach shard: load the model once, run CODI latent inference, keep the 6x6
                 attention and mass split per (problem, layer, head) in float16; resumable per shard
      aggregate  join: all problems in sample order, mean/std matrices, summary stats, accuracy
      metrics    rank heads (flow, hub, skip, composite)
      compare    against the latest run of every other model on the same sample
      end        where to find everything
    Every step has a card: `python flows/attention_flow.py card view RUN_ID/STEP`.
    """

    model = Parameter("model", default="demo", type=str,
                      help="Model preset: gpt2, llama (released CODI models) or demo (small offline demo model).")
    ckpt = Parameter("ckpt", default="", type=str,
                     help="Override the preset's CODI checkpoint: a local directory (pytorch_model.bin or "
                          "model.safetensors) or a hub id.")
    base = Parameter("base", default="", type=str,
                     help="Override the preset's base model (config + tokenizer): a local directory or hub id.")
    dataset = Parameter("dataset", default="auto", type=str,
                        help="gsm8k (the Hugging Face hub's gsm8k/main), synthetic (bundled arithmetic set), or "
                             "a path to a .jsonl / .json file of GSM8K records. auto: synthetic for the demo "
                             "model, gsm8k otherwise.")
    split = Parameter("split", default="train", type=str,
                      help="Dataset split: train or test (names the problems' ids for a file).")
    n_problems = Parameter("n_problems", default="100", type=str,
                           help="Problems to sample (seed-42 sample of the design); 0 or all = the whole split.")
    seed = Parameter("seed", default=42, type=int, help="Seed of the problem sample.")
    shard_size = Parameter("shard_size", default=50, type=int,
                           help="Problems per extract task; a failed shard is rerun alone by resume.")
    batch_size = Parameter("batch_size", default=16, type=int, help="Problems per forward batch.")
    max_new_tokens = Parameter("max_new_tokens", default=256, type=int,
                               help="Greedy decoding budget per answer (the official evaluation uses 256).")
    device = Parameter("device", default="auto", type=str, help="Torch device: auto (cuda if present), cpu, cuda, cuda:1.")
    dtype = Parameter("dtype", default="auto", type=str,
                      help="Model dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.")
    max_failed_fraction = Parameter("max_failed_fraction", default=0.1, type=float,
                                    help="A shard in which more than this fraction of problems raise fails "
                                         "(the failures are recorded either way).")
    n_boot = Parameter("n_boot", default=200, type=int,
                       help="Bootstrap resamples of the problems for the metrics' 95% intervals (0 = none).")
    compare_with = Parameter("compare_with", default="", type=str,
                             help="Run ids or pathspecs to compare with (comma separated); default: the latest "
                                  "successful run of each other model on the same sample.")

    def _params(self) -> dict:
        names = ("model", "ckpt", "base", "dataset", "split", "n_problems", "seed", "shard_size", "batch_size",
                 "max_new_tokens", "device", "dtype", "max_failed_fraction", "n_boot", "compare_with")
        return {k: getattr(self, k) for k in names}

    @card(type="blank")
    @step
    def start(self):
        """Validate every parameter (model source, dataset file, sizes), before any shard runs."""
        from cards.sample_card import DEMO_BANNER, start_card

        try:
            self.settings = check_settings(self._params())
        except ValueError as e:  # SettingsError, DatasetError, CODILoadError: the message names the parameter
            raise InvalidRun(str(e)) from None
        self.demo = self.model == "demo" and not (self.ckpt or self.base)
        if self.demo:
            print("\n" + "=" * 100 + f"\n{DEMO_BANNER}\n" + "=" * 100 + "\n")
        note = shard_note(self.settings["n"] or self.settings["n_records"], self.shard_size)
        if note:
            print(f"WARNING: {note}")
        current.run.add_tag(f"model:{self.model}")
        current.card.extend(start_card(self.settings, self.demo, [note] if note else []))
        self.next(self.sample)

    @card(type="blank")
    @step
    def sample(self):
        """The design's problem sample (codi-spec section 6), its fingerprint, and the shards."""
        from cards.sample_card import sample_card
        from codi_attn.data import dataset_fingerprint, load_records, sample_problems

        s = self.settings
        records = load_records(s["dataset"], self.split)
        problems = sample_problems(records, s["n"], seed=self.seed, split=self.split)
        assert all(p.id.startswith(f"{self.split}_") for p in problems), "problem ids must name the split"
        self.problems = [asdict(p) for p in problems]
        self.problem_ids = [p.id for p in problems]
        self.dataset_fingerprint = dataset_fingerprint(problems)
        self.shards = [self.problems[i: i + self.shard_size] for i in range(0, len(problems), self.shard_size)]
        current.run.add_tag(f"dataset:{self.dataset_fingerprint[:12]}")
        current.card.extend(sample_card(self.problems, self.dataset_fingerprint, s["dataset"], self.split,
                                        s["n_records"], self.seed, len(self.shards), self.shard_size))
        self.next(self.extract, foreach="shards")

    @resources(gpu=1, cpu=4, memory=32000)
    @card(type="blank", refresh_interval=3)
    @step
    def extract(self):
        """One shard: load the model once, extract every problem (float16 attention, mass split, answers)."""
        from tqdm import tqdm

        from cards.extract_card import ExtractProgress
        from codi_attn.model import load_codi

        self.shard_index = self.index
        problems = self.input
        model = load_codi(self.model, ckpt=self.ckpt or None, base=self.base or None, dtype=self.dtype,
                          device=self.device)
        self.model_info = {"name": model.name, "n_layers": model.n_layers, "n_heads": model.n_heads,
                           "n_kv_heads": model.n_kv_heads, "device": str(model.device),
                           "dtype": str(model.dtype).replace("torch.", ""), "is_demo": model.is_demo,
                           "source": model.source}
        progress = ExtractProgress(current.card, self.index, len(self.shards), len(problems), self.model_info)
        bar = tqdm(total=len(problems), desc=f"shard {self.index + 1}/{len(self.shards)}", unit="problem")
        started = time.time()

        def on_batch(done, n_failed):
            bar.update(done - bar.n)
            progress.update(done, n_failed, time.time() - started)

        out = extract_shard(model, problems, self.batch_size, self.max_new_tokens, on_batch, self.index)
        bar.close()
        self.shard_ids, self.attention, self.mass = out["ids"], out["attention"], out["mass"]
        self.texts, self.predictions, self.correct = out["texts"], out["predictions"], out["correct"]
        self.failed_problems = out["failed"]
        progress.finish(self.shard_ids, self.correct, self.failed_problems, time.time() - started)
        check_failures(self.failed_problems, len(problems), self.max_failed_fraction, self.index)
        self.next(self.aggregate)

    @card(type="blank")
    @step
    def aggregate(self, inputs):
        """Join: every problem in sample order, mean and std matrices, summary stats, accuracy."""
        import numpy as np

        from cards.aggregate_card import aggregate_card
        from codi_attn.extract import MASS_PARTS

        self.merge_artifacts(inputs, include=["settings", "demo", "problems", "problem_ids", "dataset_fingerprint",
                                              "shards"])
        shards = sorted(inputs, key=lambda inp: inp.shard_index)
        self.model_info = shards[0].model_info
        merged = merge_shards(self.problem_ids, [
            {"ids": s.shard_ids, "attention": s.attention, "mass": s.mass, "texts": s.texts,
             "predictions": s.predictions, "correct": s.correct, "failed": s.failed_problems} for s in shards])
        self.sampled_ids = self.problem_ids
        self.problem_ids = merged["ids"]
        self.attention_raw = merged["attention"]
        self.attention_mass = merged["mass"]
        self.mass_parts = list(MASS_PARTS)
        self.texts, self.predictions, self.correct = merged["texts"], merged["predictions"], merged["correct"]
        self.failed_problems = merged["failed"]
        a = self.attention_raw.astype(np.float32)
        self.attention_avg = a.mean(axis=0)
        self.attention_std = a.std(axis=0)
        self.accuracy = float(self.correct.mean())
        self.attention_stats = attention_stats(self.attention_raw, self.attention_mass, MASS_PARTS)
        n, (L, H) = len(self.problem_ids), self.attention_avg.shape[:2]
        current.card.extend(aggregate_card(self.model_info, len(self.sampled_ids), self.attention_stats,
                                           self.accuracy, self.attention_avg, self.failed_problems, [
            ("problem_ids", f"list[str] [{n}]", "extracted problems, sample order"),
            ("attention_raw", f"float16 [{n}, {L}, {H}, 6, 6]", "A[n, l, h, i, j]: thought i -> thought j"),
            ("attention_mass", f"float16 [{n}, {L}, {H}, 6, 4]", f"row mass on {', '.join(MASS_PARTS)}"),
            ("attention_avg / attention_std", f"float32 [{L}, {H}, 6, 6]", "mean / std over problems"),
            ("predictions, correct, texts", f"[{n}]", "parsed answer (nan = none), match with gold, decoded text"),
            ("accuracy", "float", "fraction of extracted problems answered correctly"),
            ("failed_problems", f"list[dict] [{len(self.failed_problems)}]", "id and error of problems that raised"),
            ("attention_stats", "dict", "mass split (overall, by layer), self-attention, incoming attention "
                                        "vs the causal-uniform baseline"),
        ]))
        self.next(self.metrics)

    @card(type="blank")
    @step
    def metrics(self):
        """Rank heads (flow, hub score and position, skip, composite) with baselines and bootstrap intervals."""
        import numpy as np

        from cards.metrics_card import metrics_card
        from codi_attn.metrics import analyze

        self.metrics_report = analyze(self.attention_raw.astype(np.float32), self.attention_mass.astype(np.float32),
                                      n_boot=self.n_boot, seed=self.seed, name=self.model)
        self.ranked_heads = self.metrics_report.ranked_heads
        self.rankings = self.metrics_report.rankings
        self.criteria = self.metrics_report.criteria
        self.metric_warnings = self.metrics_report.warnings
        for w in self.metric_warnings:
            print(f"WARNING: {w}")
        current.card.extend(metrics_card(self.metrics_report))
        self.next(self.compare)

    @card(type="blank")
    @step
    def compare(self):
        """Compare with the latest run of every other model on the same sample (found through the Client API)."""
        from metaflow.cards import Markdown

        from cards.compare_card import compare_card
        from codi_attn.metrics import compare_reports

        runs = find_comparison_runs(current.flow_name, current.run_id, self.model, self.dataset_fingerprint,
                                    self.compare_with)
        self.compared_runs = [r.pathspec for r in runs]
        self.comparison = {}  # pathspec of the other run -> compare_reports DataFrame
        for run in runs:
            other = run.data.metrics_report
            names = (self.model, run.data.model)
            if names[0] == names[1]:
                names = (f"{self.model} (this run)", f"{run.data.model} ({run.id})")
            self.comparison[run.pathspec] = compare_reports(self.metrics_report, other, names)
            parts = compare_card((self.metrics_report, other), names)
            parts.insert(1, Markdown(f"Other run: `{run.pathspec}` (same sample: dataset fingerprint "
                                     f"{self.dataset_fingerprint[:12]})."))
            current.card.extend(parts)
        if not runs:
            others = " or ".join(m for m in ("gpt2", "llama") if m != self.model)
            s = self.settings
            current.card.append(Markdown(f"# Compare: {self.model} with other models on this sample"))
            current.card.append(Markdown(
                f"No other model has a finished run on this sample (dataset fingerprint "
                f"{self.dataset_fingerprint[:12]}). Make one with:\n\n```\npython flows/attention_flow.py run "
                f"--model {others} \\\n    --dataset {s['dataset']} \\\n    --split {self.split} --n_problems "
                f"{self.n_problems} --seed {self.seed}\n```\nIts compare step will find this run. To compare with "
                f"a run of your choice instead: `--compare_with RUN_ID`."))
        self.next(self.end)

    @card(type="blank")
    @step
    def end(self):
        """Where to find the artifacts, cards and files."""
        from cards.aggregate_card import end_card

        for tag in (f"model:{self.model}", f"dataset:{self.dataset_fingerprint[:12]}"):
            current.run.add_tag(tag)  # again here: a resumed run clones start and sample, not their tags
        top = list(self.ranked_heads["label"].head(5))
        current.card.extend(end_card(current.pathspec.rsplit("/", 2)[0], self.model, self.demo, self.accuracy,
                                     len(self.problem_ids), top, self.compared_runs))
        print(f"AttentionFlow {current.run_id}: {len(self.problem_ids)} problems, accuracy {100 * self.accuracy:.1f}%"
              f"; read it with Run('{current.flow_name}/{current.run_id}').data")


if __name__ == "__main__":
    AttentionFlow()
