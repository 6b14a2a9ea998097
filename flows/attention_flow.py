"""AttentionFlow: how the six continuous thoughts of a CODI model attend to each other, head by head.

    python flows/attention_flow.py run                       # offline demo model
    python flows/attention_flow.py run --model llama --dataset /path/to/gsm8k/train.jsonl
    python flows/attention_flow.py resume                    # rerun only the shards that died
    python flows/attention_flow.py run --with kubernetes     # shards on GPUs (@resources below)
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

from metaflow import FlowMutator, FlowSpec, Parameter, card, current, resources, step
from metaflow.exception import MetaflowException

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "codi_attn").is_dir() and str(ROOT) not in sys.path:  # a checkout: codi_attn/ and cards/ beside flows/
    sys.path.insert(0, str(ROOT))  # (in a remote task's code package they sit beside this file instead)



class InvalidRun(MetaflowException):
    """Shown by Metaflow as headline + message, without a traceback."""

    headline = "AttentionFlow cannot start"


class CannotContinue(MetaflowException):
    """A task that stops before doing or storing anything (inputs changed, no room): headline + message."""

    headline = "AttentionFlow cannot go on"


class ExtractionFailed(MetaflowException):
    """A shard over --max_failed_fraction, or a run with no problem extracted: headline + message."""

    headline = "AttentionFlow extraction failed"


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
                 attention and mass split per (problem, layer, head) in float16; resumable per shard and,
                 after a kill, per batch (checkpoints in the datastore)
      aggregate  join: all problems in sample order, mean/std matrices, summary stats, accuracy
      metrics    rank heads (flow, hub, skip, composite) with causal-uniform baselines and intervals
      attribute_heads  attribution patching: an estimate of every head's effect in one backward pass; picks
                 the heads to scan exactly and splits them into groups
      scan_heads foreach head group: each head ablated alone (mean, zero, resample) on the sample, one baseline
                 and one prefill per batch shared; resumable per group and per batch
      join_scan  join: every head group's outcomes in one scan
      plan_held_out  the held-out test's head sets (top heads selected on one half of the problems, random
                 head sets to compare them with), in groups
      test_held_out  foreach group of sets: each set ablated on the other half; resumable per group and per batch
      join_heads the causal head report: effects with intervals, critical heads, the attention metrics held
                 against the effects, the held-out top heads against random head sets
      after_heads  on to the next analysis asked for
      plan_thoughts  the thought analysis's units (the recording run, mean and pair patches), in groups
      analyse_thoughts  foreach group: the recording run (attended question tokens, the residual stream for probes
                 and a lens per layer), or mean patches, or clean -> corrupted patches; resumable per group and per
                 batch
      join_thoughts  what each thought holds: attended tokens, probes of the intermediate results with control
                 tasks, the lens, patching, with the findings in words
      after_thoughts  on to the validation if asked for
      plan_validation  the validation's conditions, in groups
      validate_conditions  foreach group of validation conditions: ablate the top heads against random sets of
                 other heads, block each thought, swap thoughts between problems (with a no-op control), each group
                 on its own run of the baseline; resumable per group and per batch
      validate_heads  join: the validation table, the no-op check and the logit lens of the thoughts
      compare    against the latest run of every other model on the same sample
      end        where to find everything
    --heads false, --thought_analysis false and --validate false skip their analysis's steps: metrics, after_heads
    and after_thoughts go on to the next analysis asked for (`next_analysis`), or to compare; a skipped analysis's
    reports (causal_report, head_effects, thought_report, validation_result, validation) are None.
    Every step but after_heads and after_thoughts has a card: `python flows/attention_flow.py card view RUN_ID/STEP`.
    """

    model = Parameter("model", default="demo", type=str,
                      help="Model preset: gpt2, llama (released CODI models) or demo (small offline demo model).")
    ckpt = Parameter("ckpt", default="", type=str,
                     help="Override the preset's CODI checkpoint: a local directory (pytorch_model.bin or "
                          "model.safetensors), the checkpoint file itself, or a hub id.")
    base = Parameter("base", default="", type=str,
                     help="Override the preset's base model (config + tokenizer): a local directory or hub id.")
    dataset = Parameter("dataset", default="auto", type=str,
                        help="gsm8k (the Hugging Face hub's gsm8k/main), synthetic (bundled arithmetic set), or "
                             "a path to a .jsonl / .json file of GSM8K records. auto: synthetic for the shipped demo "
                             "model (--model demo without --ckpt or --base), gsm8k otherwise.")
    split = Parameter("split", default="auto", type=str,
                      help="Dataset split: train or test (names the problems' ids for a file). auto: test for the "
                           "demo model's synthetic set (held out from its training), train otherwise (the design's "
                           "sample).")
    n_problems = Parameter("n_problems", default="100", type=str,
                           help="Problems to sample (the design's seeded sample, --seed); 0 or all = the whole "
                                "split.")
    seed = Parameter("seed", default=42, type=int,
                     help="Seed of the problem sample (the design's: 42), and of everything drawn at random "
                          "afterwards: bootstrap resamples, the held-out halves and random head sets, the "
                          "validation's random heads and resample partners, the thought analysis's plan.")
    shard_size = Parameter("shard_size", default=50, type=int,
                           help="Problems per extract task; a failed shard is rerun alone by resume.")
    batch_size = Parameter("batch_size", default=16, type=int, help="Problems per forward batch.")
    max_new_tokens = Parameter("max_new_tokens", default=256, type=int,
                               help="Greedy decoding budget per answer (the official evaluation uses 256).")
    device = Parameter("device", default="auto", type=str,
                       help="Torch device: auto (cuda if present), cpu, cuda, cuda:1.")
    dtype = Parameter("dtype", default="auto", type=str,
                      help="Model dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.")
    max_failed_fraction = Parameter("max_failed_fraction", default=0.1, type=float,
                                    help="A shard in which more than this fraction of problems raise fails, 0 to 1 "
                                         "(the failures are recorded either way).")
    n_boot = Parameter("n_boot", default=200, type=int,
                       help="Bootstrap resamples of the problems for every 95% interval: the metrics', the head "
                            "effects', the validation's and the thought analysis's. 0 = no intervals, only with "
                            "--heads, --validate and --thought_analysis false (their verdicts rest on intervals).")
    validate = Parameter("validate", default=True, type=bool,
                         help="Run the causal validation step (head ablation, thought blocking and the latent "
                              "swap, with controls); --validate false skips it.")
    validate_k = Parameter("validate_k", default=10, type=int,
                           help="Top heads by composite to ablate, together and one by one (capped at a quarter "
                                "of the heads).")
    validate_random = Parameter("validate_random", default=5, type=int,
                                help="Random control sets of k other heads (distinct; from the top-k's layers "
                                     "where they leave enough heads, else from all layers).")
    validate_group_size = Parameter("validate_group_size", default=8, type=int,
                                    help="Validation conditions per validate_conditions task (a failed group is "
                                         "rerun alone by resume).")
    ablation = Parameter("ablation", default="mean", type=str,
                         help="Head ablation of the validation (--validate; the head scan takes --head_kinds): "
                              "mean (replace the head's output-projection input by its mean over "
                              "problems), zero, or resample (by its input on another problem with as many "
                              "solution steps, at the same thought).")
    ablation_positions = Parameter("ablation_positions", default="thoughts", type=str,
                                   help="Where the validation ablates heads (the head scan: --head_positions): "
                                        "thoughts (the six thought steps) or all (every "
                                        "position: question, thoughts, EOT and decoding; mean and zero only).")
    heads = Parameter("heads", default=True, type=bool,
                      help="Run the causal head analysis (attribute_heads, scan_heads, join_scan, plan_held_out, "
                           "test_held_out, join_heads: every head "
                           "ablated alone, attribution patching, held-out top heads against random head sets); "
                           "--heads false skips it.")
    head_kinds = Parameter("head_kinds", default="mean,zero,resample", type=str,
                           help="Ablation kinds of the head scan, comma separated: mean, zero, resample (the first "
                                "is the one the card's verdict, the critical heads and the held-out test use).")
    head_positions = Parameter("head_positions", default="thoughts", type=str,
                               help="Where the head scan ablates: thoughts (the six thought steps), all (every "
                                    "position; mean and zero only), or thoughts,all (the first is the one the "
                                    "card's verdict, the critical heads and the held-out test use).")
    head_scan = Parameter("head_scan", default="all", type=str,
                          help="Which heads the exact scan ablates: all, or top:M (the M heads the attribution "
                               "estimate ranks most harmful, for models with many heads on a small machine; M "
                               "from k to the model's number of heads, where k, the held-out test's set size, is a "
                               "quarter of the heads capped at 10; the false-discovery rate stays over all heads, "
                               "the unscanned with p = 1).")
    head_group_size = Parameter("head_group_size", default=32, type=int,
                                help="Heads per scan_heads task, and head sets per test_held_out task (a failed group "
                                     "is rerun alone by resume; a multiple of the conditions stacked per forward, "
                                     "--condition_rows / --batch_size, keeps results bit for bit those of one task).")
    head_random_sets = Parameter("head_random_sets", default=50, type=int,
                                 help="Random head sets the held-out top heads are compared with (per selection).")
    thought_analysis = Parameter("thought_analysis", default=True, type=bool,
                                 help="Run the thought analysis (plan_thoughts, analyse_thoughts, join_thoughts: "
                                      "what each thought holds: attended question tokens, linear probes of the "
                                      "intermediate results with control tasks, a lens per layer, mean and "
                                      "clean->corrupted patching); false skips it.")
    thought_group_size = Parameter("thought_group_size", default=32, type=int,
                                   help="Patching units per analyse_thoughts task (a failed group is rerun alone by "
                                        "resume; a multiple of the conditions stacked per forward, --condition_rows / "
                                        "--batch_size, keeps results bit for bit those of one task).")
    condition_rows = Parameter("condition_rows", default=256, type=int,
                               help="Rows of one forward in the causal analyses, which run several conditions "
                                    "together (conditions x --batch_size); 0 runs one condition at a time. Results "
                                    "equal to float rounding; lower it if a GPU runs out of memory.")
    compare_with = Parameter("compare_with", default="", type=str,
                             help="Run ids or pathspecs to compare with (comma separated); default: the latest "
                                  "successful run of each other model on the same sample.")

    def _params(self) -> dict:
        names = ("model", "ckpt", "base", "dataset", "split", "n_problems", "seed", "shard_size", "batch_size",
                 "max_new_tokens", "device", "dtype", "max_failed_fraction", "n_boot", "validate", "validate_k",
                 "validate_random", "validate_group_size", "ablation", "ablation_positions", "heads", "head_kinds",
                 "head_positions", "head_scan", "head_group_size", "head_random_sets", "thought_analysis",
                 "thought_group_size", "condition_rows", "compare_with")
        return {k: getattr(self, k) for k in names}

    def _load_model(self, prepack: bool = True):
        """The CODI model of this run, as the parameters name it, its hub files read from the run's datastore cache
        (start filled it; prepack=False: layers autograd can go through), its files checked against those the run
        started with before any work."""
        from codi_attn.datastore import task_files
        from codi_attn.model import CODILoadError
        from codi_attn.model_cache import load_cached
        from codi_attn.provenance import ProvenanceError, check_files

        s = self.settings
        try:
            model = load_cached(task_files(self), self.model_files, self.model, s["base"], s["ckpt"],
                                dtype=self.dtype, device=self.device, prepack=prepack)
            check_files(self.provenance, model.source["files"], current.pathspec)
        except (CODILoadError, ProvenanceError) as e:
            raise CannotContinue(str(e)) from None
        return model

    def _group_model(self, n_groups: int):
        """The model for one of the n_groups tasks of a foreach step (shards, groups); on CPU the tasks that run side
        by side on a local machine share its cores."""
        import torch

        from codi_attn.shards import cpu_threads_per_shard

        model = self._load_model()
        if model.device.type == "cpu":
            torch.set_num_threads(cpu_threads_per_shard(n_groups))
        return model

    @staticmethod
    def _progress(label: str, tail: str):
        """A progress callback for a group's run: prints `label: <problems so far> tail` after each batch."""
        done = [0]

        def progress(k: int) -> None:
            done[0] += k
            print(f"{label}: {done[0]} {tail}", flush=True)

        return progress

    def _checkpoints(self, *inputs):
        """This task's mid-task checkpoints (codi_attn.checkpoints), keyed by the settings, the problems it works on
        (ids, questions and golds: the whole sample up to extraction, the extracted ones from aggregate on, so a
        resume that extracts a failed problem again recomputes the analyses) and `inputs`."""
        from codi_attn.checkpoints import problem_content, task_checkpoints

        return task_checkpoints(self, self.settings, problem_content(self._sample()), *inputs)

    def _report_checkpoints(self, checkpoints) -> None:
        """Keep and print how many batches this task read back from a checkpoint and how many it computed."""
        self.checkpoint_batches = checkpoints.counts()
        print(f"checkpoints: {self.checkpoint_batches['loaded']} read back, {self.checkpoint_batches['computed']} "
              f"computed", flush=True)

    def _stack(self) -> int:
        """Conditions per forward in the causal analyses (--condition_rows)."""
        from codi_attn.runner import stack_for

        return stack_for(self.batch_size, self.condition_rows)

    def _next_analysis(self, done: str | None) -> str:
        """The first of the analyses after `done` (None: before the first) that this run's parameters ask for, or
        "compare" where none is left: the condition of the switches in metrics, after_heads and after_thoughts."""
        asked = {"heads": self.heads, "thoughts": self.thought_analysis, "validation": self.validate}
        later = list(asked)[list(asked).index(done) + 1:] if done else list(asked)
        return next((analysis for analysis in later if asked[analysis]), "compare")

    def _sample(self) -> list[dict]:
        """The extracted problems, in sample order."""
        by_id = {p["id"]: p for p in self.problems}
        return [by_id[i] for i in self.problem_ids]

    @card(type="blank")
    @step
    def start(self):
        """Validate every parameter (model source, dataset file, sizes), before any shard runs; fingerprint the
        input files (provenance)."""
        from cards.sample_card import DEMO_BANNER, start_card
        from codi_attn.provenance import ProvenanceError, run_provenance
        from codi_attn.settings import check_settings, few_problems_note, shard_note

        try:
            self.settings = check_settings(self._params(), current.flow_name)
        except ValueError as e:  # SettingsError, DatasetError, CODILoadError: the message names the parameter
            raise InvalidRun(str(e)) from None
        try:
            self.provenance = run_provenance(self.settings)
        except ProvenanceError as e:  # an input file that cannot be read, naming its parameter
            raise InvalidRun(str(e)) from None
        self.demo = self.model == "demo" and not (self.ckpt or self.base)
        if self.demo:
            print("\n" + "=" * 100 + f"\n{DEMO_BANNER}\n" + "=" * 100 + "\n")
        n = self.settings["n"] or self.settings["n_records"]
        notes = [note for note in (shard_note(n, self.shard_size), few_problems_note(n)) if note]
        for note in notes:
            print(f"WARNING: {note}")
        current.run.add_tag(f"model:{self.model}")
        from codi_attn.datastore import task_files
        from codi_attn.model import CODILoadError
        from codi_attn.model_cache import cache_model_files

        try:  # hub files, once for every shard
            self.model_files = cache_model_files(task_files(self), current.run_id, self.settings["base"],
                                                 self.settings["ckpt"])
        except CODILoadError as e:  # offline, unknown or gated: the message says what to pass instead
            raise InvalidRun(str(e)) from None
        for what, entry in self.model_files.items():
            print(f"{what} {entry['source']}: {len(entry['paths'])} file(s) cached in the datastore for the model "
                  "steps")
        if self.heads and "base" in self.model_files:  # a hub base: its config may not have been there to check
            from codi_attn.model import CONFIG_FILE
            from codi_attn.settings import head_scan_error

            entry = self.model_files["base"]
            config = task_files(self).get(entry["paths"][entry["names"].index(CONFIG_FILE)])
            error = head_scan_error(self.settings["head_scan"], config.decode("utf-8"))
            if error:
                raise InvalidRun(error)
        current.card.extend(start_card(self.settings, self.demo, notes))
        self.next(self.sample)

    @card(type="blank")
    @step
    def sample(self):
        """The design's problem sample (codi-spec section 6), its fingerprint, and the shards."""
        from cards.sample_card import sample_card
        from codi_attn.data import DatasetError, dataset_fingerprint, load_records, sample_problems
        from codi_attn.provenance import ProvenanceError, check_dataset

        s = self.settings
        try:  # a resume reads the dataset again: it must be the file start fingerprinted
            check_dataset(self.provenance, current.pathspec)
            records = load_records(s["dataset"], s["split"])
        except (DatasetError, ProvenanceError) as e:
            raise CannotContinue(str(e)) from None
        problems = sample_problems(records, s["n"], seed=self.seed, split=s["split"])
        self.problems = [asdict(p) for p in problems]
        self.problem_ids = [p.id for p in problems]
        self.dataset_fingerprint = dataset_fingerprint(problems)
        self.shards = [self.problems[i: i + self.shard_size] for i in range(0, len(problems), self.shard_size)]
        current.run.add_tag(f"dataset:{self.dataset_fingerprint[:12]}")
        current.card.extend(sample_card(self.problems, self.dataset_fingerprint, s["dataset"], s["split"],
                                        s["n_records"], self.seed, len(self.shards), self.shard_size))
        self.next(self.extract, foreach="shards")

    @resources(gpu=1, cpu=4, memory=32000)
    @card(type="blank", refresh_interval=3)
    @step
    def extract(self):
        """One shard: load the model once, extract every problem (float16 attention, mass split, answers)."""
        from tqdm import tqdm

        from cards.extract_card import ExtractProgress
        from codi_attn.shards import ShardError, check_failures, extract_shard, outcome_line

        self.shard_index = self.index
        problems = self.input
        model = self._group_model(len(self.shards))
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

        checkpoints = self._checkpoints([p["id"] for p in problems])
        out = extract_shard(model, problems, self.batch_size, self.max_new_tokens, on_batch, self.index, checkpoints)
        bar.close()
        self._report_checkpoints(checkpoints)
        self.shard_ids, self.attention, self.mass = out["ids"], out["attention"], out["mass"]
        self.texts, self.predictions, self.correct = out["texts"], out["predictions"], out["correct"]
        self.failed_problems = out["failed"]
        progress.finish(self.shard_ids, self.correct, self.failed_problems, time.time() - started)
        print(outcome_line(f"shard {self.index + 1}/{len(self.shards)}", len(problems), self.correct,
                           self.failed_problems), flush=True)
        try:
            check_failures(self.failed_problems, len(problems), self.max_failed_fraction, self.index)
        except ShardError as e:
            raise ExtractionFailed(str(e)) from None
        self.next(self.aggregate)

    @card(type="blank")
    @step
    def aggregate(self, inputs):
        """Join: every problem in sample order, mean and std matrices, summary stats, accuracy."""
        import numpy as np

        from cards.aggregate_card import aggregate_card
        from codi_attn.conventions import MASS_PARTS
        from codi_attn.provenance import ProvenanceError, pin_files
        from codi_attn.shards import ShardError, attention_stats, merge_shards, outcome_line

        self.merge_artifacts(inputs, include=["settings", "demo", "model_files", "problems", "problem_ids",
                                              "dataset_fingerprint", "shards"])
        shards = sorted(inputs, key=lambda inp: inp.shard_index)
        try:  # every shard read the files the run started with (or, for a hub id start could not find, the same)
            shard_files = [(f"shard {s.shard_index + 1}", s.model_info["source"]["files"]) for s in shards]
            self.provenance = pin_files(shards[0].provenance, shard_files)
        except ProvenanceError as e:
            raise CannotContinue(str(e)) from None
        self.model_info = shards[0].model_info
        try:
            merged = merge_shards(self.problem_ids, [
                {"ids": s.shard_ids, "attention": s.attention, "mass": s.mass, "texts": s.texts,
                 "predictions": s.predictions, "correct": s.correct, "failed": s.failed_problems} for s in shards])
        except ShardError as e:
            raise ExtractionFailed(str(e)) from None
        self.sampled_ids = self.problem_ids
        self.problem_ids = merged["ids"]
        self.attention_raw = merged["attention"]
        self.attention_mass = merged["mass"]
        self.mass_parts = list(MASS_PARTS)
        self.texts, self.predictions, self.correct = merged["texts"], merged["predictions"], merged["correct"]
        self.failed_problems = merged["failed"]
        print(outcome_line("run", len(self.sampled_ids), self.correct, self.failed_problems), flush=True)
        a = self.attention_raw.astype(np.float32)
        self.attention_avg = a.mean(axis=0)
        self.attention_std = a.std(axis=0)
        self.accuracy = float(self.correct.mean())
        self.attention_stats = attention_stats(self.attention_raw, self.attention_mass, MASS_PARTS)
        n, (L, H) = len(self.problem_ids), self.attention_avg.shape[:2]
        current.card.extend(aggregate_card(self.model_info, len(self.sampled_ids), self.attention_stats,
                                           self.accuracy, self.attention_avg, self.failed_problems, self.provenance, [
            ("problem_ids", f"list[str] [{n}]", "extracted problems, sample order"),
            ("attention_raw", f"float16 [{n}, {L}, {H}, 6, 6]", "A[n, l, h, i, j]: thought i -> thought j"),
            ("attention_mass", f"float16 [{n}, {L}, {H}, 6, 4]", f"row mass on {', '.join(MASS_PARTS)}"),
            ("attention_avg / attention_std", f"float32 [{L}, {H}, 6, 6]", "mean / std over problems"),
            ("predictions, correct, texts", f"[{n}]", "parsed answer (nan = none), match with gold, decoded text"),
            ("accuracy", "float", "fraction of extracted problems answered correctly"),
            ("failed_problems", f"list[dict] [{len(self.failed_problems)}]", "id and error of problems that raised"),
            ("provenance", "dict", "every input file read (base, ckpt, dataset): path, size, sha256, where found"),
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
                                      n_boot=self.n_boot, seed=self.seed, name=self.model,
                                      problem_ids=self.problem_ids, fingerprint=self.dataset_fingerprint)
        self.ranked_heads = self.metrics_report.ranked_heads
        self.rankings = self.metrics_report.rankings
        self.criteria = self.metrics_report.criteria
        self.metric_warnings = self.metrics_report.warnings
        for w in self.metric_warnings:
            print(f"WARNING: {w}")
        current.card.extend(metrics_card(self.metrics_report))
        self.causal_report = self.head_effects = self.thought_report = None  # the analyses' reports: None where
        self.validation_result = self.validation = None  # a parameter skips the analysis
        self.next_analysis = self._next_analysis(None)
        self.next({"heads": self.attribute_heads, "thoughts": self.plan_thoughts, "validation": self.plan_validation,
                   "compare": self.compare}, condition="next_analysis")

    @resources(gpu=1, cpu=4, memory=32000)
    @card(type="blank")
    @step
    def attribute_heads(self):
        """Attribution patching: every head's estimated effect from one backward pass; the heads to scan, in groups."""
        from metaflow.cards import Markdown

        from codi_attn.heads_run import plan_scan

        s = self.settings
        checkpoints = self._checkpoints("attribution")
        problems = self._sample()
        self.head_estimates, self.head_groups = plan_scan(
            self._load_model(prepack=False), problems, s["head_kinds"], s["head_positions"], s["head_scan"],
            self.head_group_size, self.batch_size, self.max_new_tokens, checkpoints,
            self._progress("attribution", f"of {len(problems)} problems through the backward pass"))
        self._report_checkpoints(checkpoints)
        current.card.append(Markdown(
            f"# Attribute heads\n\nAttribution estimates for every head; {sum(map(len, self.head_groups))} heads to "
            f"scan exactly in {len(self.head_groups)} group(s)."))
        self.next(self.scan_heads, foreach="head_groups")

    @resources(gpu=1, cpu=4, memory=32000)
    @card(type="blank")
    @step
    def scan_heads(self):
        """One group of heads: each ablated alone, once per kind and positions, on the whole sample."""
        from metaflow.cards import Markdown

        from codi_attn.conventions import head_label
        from codi_attn.heads import problem_texts
        from codi_attn.heads_run import scan_heads

        s = self.settings
        self.group_index = self.index
        group = [tuple(h) for h in self.input]
        checkpoints = self._checkpoints(group)
        problems = self._sample()
        progress = self._progress(f"scan group {self.index + 1}/{len(self.head_groups)}",
                                  f"of {len(problems)} problems through the group's {len(group)} head(s)")
        self.head_scan_part = scan_heads(
            self._group_model(len(self.head_groups)), *problem_texts(problems), group, s["head_kinds"],
            s["head_positions"], self.batch_size, self.max_new_tokens, progress, self._stack(), checkpoints)
        self._report_checkpoints(checkpoints)
        current.card.append(Markdown(f"# Scan heads: group {self.index + 1} of {len(self.head_groups)}\n\n"
                                     f"{len(group)} heads: {' '.join(head_label(*h) for h in group)}."))
        self.next(self.join_scan)

    @card(type="blank")
    @step
    def join_scan(self, inputs):
        """Join the head groups: every single-head ablation's outcomes in one scan."""
        from metaflow.cards import Markdown

        from codi_attn.heads import merge_scans

        self.merge_artifacts(inputs, exclude=["head_scan_part", "group_index", "checkpoint_batches"])
        parts = [i.head_scan_part for i in sorted(inputs, key=lambda i: i.group_index)]
        self.head_ablations = merge_scans(parts)
        current.card.append(Markdown(f"# Join scan\n\n{len(self.head_ablations)} single-head ablations from "
                                     f"{len(parts)} group(s)."))
        self.next(self.plan_held_out)

    @card(type="blank")
    @step
    def plan_held_out(self):
        """The held-out test's head sets: top heads chosen on half A, random sets to compare them with, in groups."""
        from metaflow.cards import Markdown

        self.held_out_plan, self.held_out_groups = None, [[]]
        if len(self.problem_ids) >= 4:
            from codi_attn.heads import plan_held_out

            s = self.settings
            self.held_out_plan = plan_held_out(self.head_ablations, self.attention_raw.astype("float32"),
                                               s["head_kinds"][0], s["head_positions"][0],
                                               n_random=self.head_random_sets, seed=self.seed)
            self.held_out_groups = self.held_out_plan.groups(self.head_group_size)
        current.card.append(Markdown("# Plan held-out test\n\n" + (
            f"{len(self.held_out_plan.sets)} head sets (k = {self.held_out_plan.k}) to ablate on half B "
            f"({len(self.held_out_plan.problems_b)} problems) in {len(self.held_out_groups)} group(s)."
            if self.held_out_plan is not None else "No held-out test: it needs four problems or more.")))
        self.next(self.test_held_out, foreach="held_out_groups")

    @resources(gpu=1, cpu=4, memory=32000)
    @card(type="blank")
    @step
    def test_held_out(self):
        """One group of held-out head sets, each ablated on half B against half B's baseline."""
        from metaflow.cards import Markdown

        from codi_attn.conventions import head_label

        self.held_out_part, self.checkpoint_batches = None, None
        if self.input:
            from codi_attn.heads import problem_texts
            from codi_attn.heads_run import held_out_part

            checkpoints = self._checkpoints("held-out", [self.problem_ids[i] for i in self.held_out_plan.problems_b],
                                            [list(self.held_out_plan.sets[i][2]) for i in self.input])
            progress = self._progress(f"held-out group {self.index + 1}/{len(self.held_out_groups)}",
                                      f"of {len(self.held_out_plan.problems_b)} problems of half B through the "
                                      f"group's {len(self.input)} head set(s)")
            self.held_out_part = held_out_part(
                self._group_model(len(self.held_out_groups)), *problem_texts(self._sample()), self.held_out_plan,
                self.input, self.batch_size, self.max_new_tokens, self._stack(), checkpoints, progress)
            self._report_checkpoints(checkpoints)
        sets = [self.held_out_plan.sets[i] for i in self.input] if self.input else []
        current.card.append(Markdown(
            f"# Test held-out sets: group {self.index + 1} of {len(self.held_out_groups)}\n\n"
            + (f"{len(sets)} head set(s) ablated on half B:\n\n"
               + "\n".join(f"- {name}: {' '.join(head_label(*h) for h in heads)}" for name, _, heads, _ in sets)
               if sets else "Skipped: no held-out test (it needs four problems or more).")))
        self.next(self.join_heads)

    @card(type="blank")
    @step
    def join_heads(self, inputs):
        """Join the held-out groups: the causal head report (effects, critical heads, metrics vs effects, held-out
        test)."""
        from cards.heads_card import heads_card
        from codi_attn.heads import causal_analysis

        self.merge_artifacts(inputs, exclude=["held_out_part", "checkpoint_batches"])
        parts = [i.held_out_part for i in inputs if i.held_out_part is not None]
        s = self.settings
        self.causal_report = causal_analysis(
            self.head_ablations, self.held_out_plan, parts, self._sample(), self.attention_raw, self.attention_mass,
            self.head_estimates, s["head_kinds"][0], s["head_positions"][0], self.n_boot, self.seed)
        self.head_effects = self.causal_report.head_effects
        current.card.extend(heads_card(self.causal_report, self.ranked_heads))
        self.next(self.after_heads)

    @step
    def after_heads(self):
        """On to the next analysis asked for (a join step cannot choose its next step itself)."""
        self.next_analysis = self._next_analysis("heads")
        self.next({"thoughts": self.plan_thoughts, "validation": self.plan_validation, "compare": self.compare},
                  condition="next_analysis")

    @card(type="blank")
    @step
    def plan_thoughts(self):
        """The thought analysis in groups of tasks: the recording run, then the mean and the pair patches."""
        from metaflow.cards import Markdown

        from codi_attn.contents import plan_thoughts

        heads = [] if self.causal_report is None else [
            (int(r.layer), int(r.head)) for r in self.causal_report.critical().itertuples()]
        self.thought_plan = plan_thoughts(self._sample(), self.settings["dataset"] == "synthetic",
                                          self.model_info["n_layers"], heads, self.n_boot, self.seed)
        self.thought_groups = self.thought_plan.groups(self.thought_group_size)
        current.card.append(Markdown(f"# Plan thoughts\n\n{len(self.thought_plan.units)} units (the recording, mean "
                                     f"and pair patches) in {len(self.thought_groups)} group(s)."))
        self.next(self.analyse_thoughts, foreach="thought_groups")

    @resources(gpu=1, cpu=4, memory=32000)
    @card(type="blank")
    @step
    def analyse_thoughts(self):
        """One group of the thought analysis on the whole sample: the recording run, or mean or pair patches."""
        from metaflow.cards import Markdown

        from codi_attn.contents_run import analyse_group

        self.thought_index = self.index
        units = list(self.input)
        progress = self._progress("thoughts", f"problems through the group's {len(units)} unit(s)")
        checkpoints = self._checkpoints(units, self.thought_plan.settings)  # what each unit patches, the heads read
        self.thought_part = analyse_group(self._group_model(len(self.thought_groups)), self._sample(),
                                          self.thought_plan, units, self.batch_size, self.max_new_tokens,
                                          self._stack(), checkpoints, progress)
        self._report_checkpoints(checkpoints)
        current.card.append(Markdown(f"# Analyse thoughts: group {self.index + 1} of {len(self.thought_groups)}\n\n"
                                     + ", ".join(f"`{u.name}`" for u in units)))
        self.next(self.join_thoughts)

    @card(type="blank")
    @step
    def join_thoughts(self, inputs):
        """Join the thought groups: what each thought holds (attended tokens, probes with control tasks, a lens per
        layer, patching), with the findings in words."""
        from cards.thoughts_card import thoughts_card
        from codi_attn.contents import join_thoughts

        self.merge_artifacts(inputs, exclude=["thought_part", "thought_index", "checkpoint_batches"])
        parts = [i.thought_part for i in sorted(inputs, key=lambda i: i.thought_index)]
        self.thought_report = join_thoughts(self.thought_plan, parts, self._sample())
        for line in self.thought_report.findings:
            print(f"thoughts: {line}")
        current.card.extend(thoughts_card(self.thought_report))
        self.next(self.after_thoughts)

    @step
    def after_thoughts(self):
        """On to the validation if asked for, else to compare."""
        self.next_analysis = self._next_analysis("thoughts")
        self.next({"validation": self.plan_validation, "compare": self.compare}, condition="next_analysis")

    @card(type="blank")
    @step
    def plan_validation(self):
        """The validation's conditions (top-k and random heads, blocking, the swap), in groups of tasks."""
        from metaflow.cards import Markdown

        from codi_attn.validate import plan_validation

        self.validation_plan = plan_validation(self.ranked_heads, self.model_info["n_layers"],
                                               self.model_info["n_heads"], len(self.problem_ids), self.validate_k,
                                               self.validate_random, self.seed)
        self.validation_groups = self.validation_plan.groups(self.validate_group_size)
        current.card.append(Markdown(f"# Plan validation\n\n{len(self.validation_plan.conditions)} conditions in "
                                     f"{len(self.validation_groups)} group(s)."))
        self.next(self.validate_conditions, foreach="validation_groups")

    @resources(gpu=1, cpu=4, memory=32000)
    @card(type="blank")
    @step
    def validate_conditions(self):
        """One group of validation conditions on the whole sample, measured against its own run of the baseline."""
        from metaflow.cards import Markdown

        from codi_attn.heads import problem_texts
        from codi_attn.validate_run import validate_group

        self.validation_index = self.index
        conds = list(self.input)
        problems = self._sample()
        progress = self._progress("validate", f"of {len(problems)} problems through the group's conditions")
        checkpoints = self._checkpoints(conds)  # each condition's heads and blocked thoughts, not only its name
        self.validation_part = validate_group(
            self._group_model(len(self.validation_groups)), *problem_texts(problems), conds, ablation=self.ablation,
            positions=self.ablation_positions, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
            seed=self.seed, n_boot=self.n_boot, progress=progress, stack=self._stack(),
            checkpoints=checkpoints)
        self._report_checkpoints(checkpoints)
        current.card.append(Markdown(f"# Validate: group {self.index + 1} of {len(self.validation_groups)}\n\n"
                                     + ", ".join(f"`{c.name}`" for c in conds)))
        self.next(self.validate_heads)

    @card(type="blank")
    @step
    def validate_heads(self, inputs):
        """Join the validation groups: the causal check of the ranking (top-k vs random sets of other heads, each
        thought blocked, the latent swap, with controls) and the logit lens."""
        from cards.validate_card import validate_card
        from codi_attn.validate import join_validation

        self.merge_artifacts(inputs, exclude=["validation_part", "validation_index", "checkpoint_batches"])
        parts = [i.validation_part for i in sorted(inputs, key=lambda i: i.validation_index)]
        self.validation_result = join_validation(self.validation_plan, parts)
        self.validation = self.validation_result.validation
        current.card.extend(validate_card(self.validation_result))
        self.next(self.compare)

    @card(type="blank")
    @step
    def compare(self):
        """Compare with the latest run of every other model on the same sample (found through the Client API)."""
        from codi_attn.runs import find_comparison_runs

        runs = find_comparison_runs(current.flow_name, current.run_id, self.model, self.dataset_fingerprint,
                                    self.compare_with)
        self.compared_runs = [r.pathspec for r in runs]
        self.comparison = {}  # pathspec of the other run -> compare_reports DataFrame
        self.causal_comparison = {}  # pathspec of the other run -> compare_causal DataFrame (both ran the heads)
        for run in runs:
            from cards.compare_card import basis_md, compare_card
            from codi_attn.metrics import compare_reports
            from codi_attn.runs import comparison_basis

            other = run.data.metrics_report
            names = (self.model, run.data.model)
            if names[0] == names[1]:
                names = (f"{self.model} (this run)", f"{run.data.model} ({run.id})")
            self.comparison[run.pathspec] = compare_reports(self.metrics_report, other, names)
            parts = compare_card((self.metrics_report, other), names, self.comparison[run.pathspec])
            parts.insert(1, basis_md(run.pathspec, comparison_basis(self, run.data)))
            theirs = getattr(run.data, "causal_report", None) if "causal_report" in run.data else None
            if self.causal_report is not None and theirs is not None:
                from cards.compare_card import causal_comparison_card
                from codi_attn.heads import compare_causal

                self.causal_comparison[run.pathspec] = compare_causal((self.causal_report, theirs), names)
                parts += causal_comparison_card(self.causal_comparison[run.pathspec])
            current.card.extend(parts)
        if not runs:
            from cards.compare_card import no_comparison_card

            current.card.extend(no_comparison_card(self.model, self.settings["dataset"], self.settings["split"],
                                                   self.n_problems, self.seed, self.dataset_fingerprint))
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
                                     len(self.problem_ids), top, self.causal_report, self.compared_runs))
        print(f"AttentionFlow {current.run_id}: {len(self.problem_ids)} of {len(self.sampled_ids)} problems extracted"
              f", {len(self.failed_problems)} failed (failed_problems), accuracy {100 * self.accuracy:.1f}%; read it "
              f"with Run('{current.flow_name}/{current.run_id}').data")


if __name__ == "__main__":
    from codi_attn.full_disk import explain_full_disk

    explain_full_disk()  # a full disk under the datastore: one line naming it and what to do, no traceback
    AttentionFlow()
