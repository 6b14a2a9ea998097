"""Finding earlier AttentionFlow runs to compare with, through the Metaflow Client API."""
from __future__ import annotations


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
