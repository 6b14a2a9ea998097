"""Finding earlier AttentionFlow runs to compare with, through the Metaflow Client API, and what two runs share."""
from __future__ import annotations

SAMPLE_SETTINGS = {"dataset": "--dataset", "split": "--split", "n": "--n_problems", "seed": "--seed"}
OWN_SETTINGS = ("model", "ckpt", "base", "compare_with", "n_problems", "n_records")  # differ by design, or shown


def as_written(key: str, value) -> str:
    """Setting `key` as its parameter is written: None (the whole split) is all, lists are comma separated, the
    parsed --head_scan (codi_attn.settings.parse_head_scan) is all or top:M."""
    if value is None:
        return "all"
    if key == "head_scan" and isinstance(value, (tuple, list)):
        return "all" if value[0] == "all" else f"top:{value[1]}"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


def setting_differences(here: dict, there: dict, keys=None) -> list[str]:
    """'--name A here, B there' for each setting (of `keys`, default all but the model's own) that differs."""
    keys = keys or [k for k in {**here, **there} if k not in OWN_SETTINGS]
    flags = {**{k: f"--{k}" for k in keys}, **SAMPLE_SETTINGS}
    return [f"{flags[k]} {as_written(k, here.get(k))} here, {as_written(k, there.get(k))} there" for k in keys
            if as_written(k, here.get(k)) != as_written(k, there.get(k))]


def sample_difference(run, fingerprint: str, settings: dict) -> str | None:
    """Why another run's problem sample is not this run's (None when their fingerprints are equal): the sample
    settings that differ, or, when none does, that the dataset's records did."""
    theirs = run.data.dataset_fingerprint
    if theirs == fingerprint:
        return None
    why = "; ".join(setting_differences(settings, run.data.settings, list(SAMPLE_SETTINGS))) or (
        "the same --dataset, --split, --n_problems and --seed, so the dataset's records differ")
    return (f"run {run.pathspec} has another sample (dataset fingerprint {theirs[:12]} there, {fingerprint[:12]} "
            f"here): {why}")


def comparison_basis(here, there) -> dict:
    """What two runs' comparison rests on (each a flow or run.data with the aggregate's artifacts): the sample
    fingerprints, the problems each extracted and both did, the model shapes and the settings that differ."""
    both = set(here.problem_ids) & set(there.problem_ids)
    return {"same_sample": here.dataset_fingerprint == there.dataset_fingerprint,
            "fingerprints": (here.dataset_fingerprint, there.dataset_fingerprint),
            "sampled": (len(here.sampled_ids), len(there.sampled_ids)),
            "extracted": (len(here.problem_ids), len(there.problem_ids)), "in_both": len(both),
            "shapes": tuple((r.model_info["n_layers"], r.model_info["n_heads"]) for r in (here, there)),
            "differences": setting_differences(here.settings, there.settings)}


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
            raise ValueError(f"run {pathspec} not found in this datastore: pass the id (or {flow_name}/ID) of a "
                             "finished run stored there (the local datastore is the .metaflow folder under "
                             "METAFLOW_DATASTORE_SYSROOT_LOCAL, or the current directory)") from None
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
