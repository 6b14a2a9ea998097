"""Hub model files cached once per run in the run's datastore: the flow's start step downloads the CODI checkpoint
and the base model's config and tokenizer of every hub id once (`cache_model_files`), and every model step (each
shard, on whatever worker) loads them from the datastore (`load_cached`) instead of downloading them again.

    <flow>/codi_attn/models/<run id>/<base|ckpt>/<file>

Local directories are loaded where they are (on a cluster: a path every worker has, or a hub id). A resumed run
clones start, and with it the cache entry of the run it resumes.
"""
from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path

from codi_attn.datastore import DatastoreFiles
from codi_attn.model import CODILoadError, CODIModel, _checkpoint_file, hub_hint, is_local, load_codi

BASE_FILES = ("*.json", "*.txt", "*.model")  # config and tokenizer: the weights come from the checkpoint


def download(source: str, what: str) -> list[Path]:
    """The files of hub id `source` that loading needs: the checkpoint file (what = 'ckpt') or the base model's
    config and tokenizer files (what = 'base'), downloaded into the Hugging Face cache."""
    if what == "ckpt":
        return [_checkpoint_file(source)]
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(source, allow_patterns=list(BASE_FILES)))
    except Exception as e:  # offline, unknown repo, gated: all mean "pass a local dir"
        raise hub_hint("base model", source, "--base", e) from e
    return sorted(p for p in folder.rglob("*") if p.is_file())


def cache_model_files(files: DatastoreFiles, run_id: str, base: str, ckpt: str) -> dict:
    """Download every hub id among `base` and `ckpt` once and store its files in the datastore; returns the cache
    entry {'base'|'ckpt': {'source', 'paths', 'names'}} (empty for local directories). A hub id that cannot be
    downloaded raises CODILoadError, after both were tried: one line for each that failed."""
    entry, failed = {}, []
    for what, source in (("base", base), ("ckpt", ckpt)):
        if is_local(source):
            continue
        try:
            local = download(source, what)
        except CODILoadError as e:
            failed.append(str(e))
            continue
        root = local[0].parent if what == "ckpt" else _common_folder(local)
        names = [str(p.relative_to(root)) for p in local]
        paths = [files.path("models", str(run_id), what, name) for name in names]
        for path, file in zip(paths, local):
            files.put_file(path, file)
        entry[what] = {"source": source, "paths": paths, "names": names}
    if failed:
        raise CODILoadError("\n".join(failed))
    return entry


def _common_folder(paths: list[Path]) -> Path:
    root = paths[0].parent
    while not all(root in p.parents for p in paths):
        root = root.parent
    return root


def load_cached(files: DatastoreFiles, entry: dict, model: str, base: str, ckpt: str, **options) -> CODIModel:
    """load_codi(model, ckpt, base, **options) with the hub ids of `entry` read from the datastore; the model's
    `source` names the hub ids (and `cached: datastore`) as a download would."""
    with ExitStack() as stack:
        local = {"base": base, "ckpt": ckpt}
        for what, cached in entry.items():
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"codi_attn_{what}_")))
            local[what] = str(stack.enter_context(files.folder(cached["paths"], cached["names"], folder)))
        loaded = load_codi(model, ckpt=local["ckpt"], base=local["base"], **options)
    loaded.source.update(base=base, ckpt=ckpt, **({"cached": "datastore"} if entry else {}))
    return loaded
