"""Run settings of AttentionFlow: every parameter checked cheaply, before any shard runs."""
from __future__ import annotations

import math
import os

from codi_attn.conventions import ABLATIONS, POSITIONS
from codi_attn.data import (HUB_NAME, SPLITS, SYNTHETIC_NAME, dataset_fingerprint, load_records, resolve_n,
                            sample_problems)
from codi_attn.presets import PRESETS
from codi_attn.runs import named_runs, sample_difference

DEMO_DATASET = "synthetic"
MAX_NUM_SPLITS = 100  # Metaflow's default --max-num-splits: a foreach wider than this stops the run
FEW_PROBLEMS = 20  # below this many problems the start card and every verdict carry `few_problems_note`


class SettingsError(ValueError):
    """A parameter of the run that cannot work; raised in start, before any shard runs."""


def resolve_dataset(dataset: str, model: str, ckpt: str, base: str) -> str:
    """'auto' = the bundled synthetic set for the demo model, the hub's gsm8k for the others."""
    if dataset != "auto":
        return dataset
    return DEMO_DATASET if model == "demo" and not (ckpt or base) else "gsm8k"


def check_settings(p: dict, flow_name: str = "AttentionFlow") -> dict:
    """Validate every parameter cheaply (nothing is loaded but the dataset records and the base's config.json;
    model files are only looked for, in the local hub cache for hub ids, and the hub is asked once whether it
    answers where an input needs it) and return the settings the run uses, plus n (None = whole split) and
    n_records. Every problem found is reported at once, one line each naming the parameter, in a SettingsError."""
    from codi_attn.hub import dataset_cached, datasets_offline, hub_unreachable
    from codi_attn.model import (CONFIG_FILE, check_checkpoint, check_device, hub_hint, locate_sources,
                                 resolve_device_dtype, resolve_sources)

    dataset = resolve_dataset(p["dataset"], p["model"], p["ckpt"], p["base"])
    split = p["split"] if p["split"] != "auto" else ("test" if dataset == DEMO_DATASET else "train")
    errors, out = [], {**p, "dataset": dataset, "split": split}

    def check(what: str, fn):
        try:
            return fn()
        except (ValueError, RuntimeError) as e:  # DatasetError, CODILoadError, torch's bad device string
            errors.append(f"{what}: {e}")

    for name in ("shard_size", "batch_size", "max_new_tokens"):
        if p[name] <= 0:
            errors.append(f"--{name} must be a positive integer, got {p[name]}")
    if p["validate"]:
        if p["validate_k"] <= 0 or p["validate_random"] <= 0:
            errors.append(f"--validate_k and --validate_random must be positive, got {p['validate_k']} and "
                          f"{p['validate_random']}")
        if p["validate_group_size"] <= 0:
            errors.append(f"--validate_group_size must be a positive integer, got {p['validate_group_size']}")
    # checked with --validate false too: stored in the settings, and compared between runs
    if p["ablation"] not in ABLATIONS:
        errors.append(f"--ablation must be one of {', '.join(ABLATIONS)}, got {p['ablation']!r}")
    if p["ablation_positions"] not in POSITIONS:
        errors.append(f"--ablation_positions must be one of {', '.join(POSITIONS)}, got {p['ablation_positions']!r}")
    elif p["ablation"] == "resample" and p["ablation_positions"] != "thoughts":
        errors.append("--ablation resample is defined at the thought positions only: use --ablation_positions "
                      "thoughts (or --ablation mean / zero for all positions)")
    kinds = tuple(k.strip() for k in p["head_kinds"].split(",") if k.strip())
    where = tuple(w.strip() for w in p["head_positions"].split(",") if w.strip())
    # parsed with --heads false too, so that two runs' settings compare alike (codi_attn.runs.setting_differences)
    out["head_kinds"], out["head_positions"] = kinds, where
    out["head_scan"] = parse_head_scan(p["head_scan"], errors if p["heads"] else [])
    if p["heads"]:
        if not kinds or any(k not in ABLATIONS for k in kinds) or len(set(kinds)) < len(kinds):
            errors.append(f"--head_kinds must list distinct kinds among {', '.join(ABLATIONS)}, got "
                          f"{p['head_kinds']!r}")
        if not where or any(w not in POSITIONS for w in where) or len(set(where)) < len(where):
            errors.append(f"--head_positions must list distinct places among {', '.join(POSITIONS)}, got "
                          f"{p['head_positions']!r}")
        if kinds == ("resample",) and "thoughts" not in where:
            errors.append("--head_kinds resample is defined at the thought positions only, and --head_positions "
                          f"{p['head_positions']!r} leaves the scan nothing to run: add thoughts, or a mean / "
                          "zero kind")
        elif kinds[:1] == ("resample",) and where[:1] == ("all",):
            errors.append(f"--head_kinds {p['head_kinds']!r} with --head_positions {p['head_positions']!r}: the "
                          "verdict, the critical heads and the held-out test take the first kind at the first "
                          "positions, and resample is not run at all positions: list thoughts first in "
                          "--head_positions, or a mean / zero kind first in --head_kinds")
        if p["head_group_size"] <= 0 or p["head_random_sets"] <= 0:
            errors.append(f"--head_group_size and --head_random_sets must be positive, got {p['head_group_size']} "
                          f"and {p['head_random_sets']}")
    if p["thought_analysis"] and p["thought_group_size"] <= 0:
        errors.append(f"--thought_group_size must be a positive integer, got {p['thought_group_size']}")
    if p["condition_rows"] < 0:
        errors.append(f"--condition_rows must be 0 or more, got {p['condition_rows']}")
    if p["n_boot"] < 0:
        errors.append(f"--n_boot must be 0 or more, got {p['n_boot']}")
    analyses = [f"--{name}" for name in ("heads", "validate", "thought_analysis") if p[name]]
    if p["n_boot"] == 0 and analyses:
        errors.append(f"--n_boot 0 gives no intervals, and the verdicts of {', '.join(analyses)} (critical heads, "
                      "effects that exclude 0, results decodable above control) rest on them: give --n_boot "
                      f"(default 200), or turn {' and '.join(analyses)} off with false")
    if not 0.0 <= p["max_failed_fraction"] <= 1.0:
        errors.append(f"--max_failed_fraction must be between 0 and 1, got {p['max_failed_fraction']}")
    check("--dtype", lambda: resolve_device_dtype("cpu", p["dtype"]))
    if p["device"] != "auto":
        check("--device", lambda: check_device(p["device"]))
    if p["model"] not in PRESETS:
        errors.append(f"--model: unknown preset {p['model']!r}; choose one of: {', '.join(PRESETS)}")
    else:
        sources = check("--model/--ckpt/--base", lambda: resolve_sources(p["model"], p["ckpt"] or None,
                                                                          p["base"] or None))
        if sources:  # config, tokenizer and checkpoint files where they can be found without loading
            found = check("--model/--ckpt/--base", lambda: locate_sources(p["model"], ckpt=sources[1],
                                                                         base=sources[0]))
            if found and found["base"] and found["ckpt"]:  # keys and shapes from the file's header
                check("--model/--ckpt/--base", lambda: check_checkpoint(
                    p["model"], found["base"][CONFIG_FILE].parent, next(iter(found["ckpt"].values()))))
            for key, what, source in (("base", "base model", sources[0]), ("ckpt", "checkpoint", sources[1])):
                why = found and found[key] is None and hub_unreachable()  # a hub id the local cache lacks
                if why:
                    error = hub_hint(what, source, f"--{key}", f"not in the local cache, and {why}")
                    errors.append(f"--{key}: {error}")
            if found and found["base"] and p["heads"]:
                error = head_scan_error(out["head_scan"], found["base"][CONFIG_FILE].read_text(encoding="utf-8"))
                errors += [error] if error else []
        out["base"], out["ckpt"] = (absolute(s) for s in sources) if sources else (p["base"], p["ckpt"])
    runs = check("--compare_with", lambda: named_runs(flow_name, p["compare_with"])) if p["compare_with"] else None
    records = None
    if split not in SPLITS:
        errors.append(f"--split must be auto or one of {', '.join(SPLITS)}, got {p['split']!r}")
    else:
        why = out["dataset"] == HUB_NAME and not datasets_offline() and hub_unreachable()  # offline: the cache
        if why and not dataset_cached(HUB_NAME):  # a cached copy: datasets falls back on it
            errors.append(f"--dataset: the GSM8K {split} split cannot be downloaded ({why}) and no copy is cached: "
                          f"pass a local copy of OpenAI's grade-school-math {split}.jsonl, --dataset "
                          f"/path/to/gsm8k/{split}.jsonl")
        else:
            records = check("--dataset", lambda: load_records(out["dataset"], split))
    if records is not None:
        before = len(errors)
        out["n"] = check("--n_problems", lambda: resolve_n(p["n_problems"], len(records)))
        out["n_records"] = len(records)
        n = out["n"] or len(records)
        pairs = [what for what, on in (("--head_kinds resample", p["heads"] and "resample" in out["head_kinds"]),
                                       ("--ablation resample", p["validate"] and p["ablation"] == "resample")) if on]
        if len(errors) == before and n < 2 and pairs:
            errors.append(f"--n_problems: {' and '.join(pairs)} feed each problem another problem's head inputs, "
                          f"which needs two problems or more; this run has {n}: sample more, or ablate by mean / "
                          "zero")
        if runs and len(errors) == before:  # the other runs must have sampled the problems this run will
            fingerprint = dataset_fingerprint(sample_problems(records, out["n"], seed=p["seed"], split=split))
            errors += [f"--compare_with: {d}" for d in (sample_difference(r, fingerprint, out) for r in runs) if d]
    if errors:
        raise SettingsError("\n".join(errors))
    if dataset not in (HUB_NAME, SYNTHETIC_NAME):
        out["dataset"] = absolute(dataset)
    return out


def absolute(source: str) -> str:
    """A local path as an absolute one (a resume from another folder finds it), a hub id as it is."""
    from codi_attn.model import is_local

    path = os.path.expanduser(source)
    return os.path.abspath(path) if is_local(source) and os.path.exists(path) else source


def head_scan_error(head_scan: tuple[str, int | None], config_text: str) -> str | None:
    """Why --head_scan top:M cannot work on the model of this config.json text (None when it can): the held-out
    test selects its k top heads (codi_attn.heads.default_k) among the scanned ones, so M must be k or more, and
    the model has no more than its own heads to scan."""
    import json

    from codi_attn.heads import MAX_K, default_k

    config = json.loads(config_text)
    n_layers = config.get("num_hidden_layers", config.get("n_layer"))
    n_heads = config.get("num_attention_heads", config.get("n_head"))
    if head_scan[0] != "top" or not n_layers or not n_heads:
        return None
    k = default_k(n_layers, n_heads)
    if head_scan[1] > n_layers * n_heads:
        return (f"--head_scan top:{head_scan[1]} asks for more heads than the model has ({n_layers} x {n_heads} = "
                f"{n_layers * n_heads}): give top:M with M from {k} to {n_layers * n_heads}, or all")
    if head_scan[1] >= k:
        return None
    return (f"--head_scan top:{head_scan[1]} scans fewer heads than the held-out test selects among them: k = {k} "
            f"(a quarter of the model's {n_layers} x {n_heads} heads, at most {MAX_K}): give top:{k} or more, or all")


def parse_head_scan(spec: str, errors: list[str]) -> tuple[str, int | None]:
    """--head_scan: 'all' -> ('all', None); 'top:M' -> ('top', M); a bad value adds an error line."""
    text = spec.strip().lower()
    if text == "all":
        return ("all", None)
    head, _, m = text.partition(":")
    if head == "top" and m.isdigit() and int(m) > 0:
        return ("top", int(m))
    errors.append(f"--head_scan must be all or top:M with M a positive number of heads, got {spec!r}")
    return ("all", None)


def few_problems_note(n_problems: int, what: str = "") -> str | None:
    """A warning for a run, and each verdict, on fewer than FEW_PROBLEMS problems (None from there on; `what`
    names the part of the run they are, e.g. 'half B'): percentile-bootstrap intervals over so few problems are
    too narrow, covering the truth less often than they say."""
    if n_problems >= FEW_PROBLEMS:
        return None
    distinct = math.comb(2 * n_problems - 1, n_problems) if n_problems else 0
    return (f"only {n_problems} problem{'s' * (n_problems != 1)}{' in ' + what if what else ''}: percentile-bootstrap "
            "95% intervals over so few problems are too narrow (they cover the truth less often than 95%"
            + (f"; these have only {distinct:,} distinct resample{'s' * (distinct != 1)}" if distinct < 1000 else "")
            + "), so the verdicts built on them describe these problems, not the model; sample "
            f"{FEW_PROBLEMS} or more (--n_problems, default 100) before reading them as findings")


def shard_note(n_problems: int, shard_size: int) -> str | None:
    """A warning when the extract foreach would be wider than Metaflow's default limit."""
    n_shards = -(-n_problems // shard_size)
    if n_shards <= MAX_NUM_SPLITS:
        return None
    return (f"{n_problems} problems in shards of {shard_size} make {n_shards} extract tasks, more than Metaflow's "
            f"default limit of {MAX_NUM_SPLITS}: the run stops after sample unless it was started as "
            f"`run --max-num-splits {n_shards} ...` or with --shard_size {-(-n_problems // MAX_NUM_SPLITS)} or more.")
