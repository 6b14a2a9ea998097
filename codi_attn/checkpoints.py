"""Mid-task checkpoints: a long task (an extract shard, a head-scan group, a validation group) saves each batch it
finishes in the run's datastore, so that after a SIGKILL or a lost node `@retry` (the same run) and `resume` (a new
run from the failed one) redo only the batches that had not finished.

    <flow>/codi_attn/checkpoints/<run id>/<step>/<foreach index>-<fingerprint>/<name>

A task reads a checkpoint from its own run first (an earlier attempt), then from the run it resumes (Metaflow's
origin run), and saves what it took from there under its own run as well, so that a resume of a resume finds it.
The fingerprint hashes the task's inputs (settings, problems with their text and gold, heads), so a task with
other inputs never reads it.
Checkpoints are pickled Python objects (numpy arrays inside), as Metaflow's artifacts are. One that no longer
unpickles (written by another version of codi-attn, whose classes moved) is recomputed, with a warning naming it.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from codi_attn.datastore import DatastoreFiles, task_files

T = TypeVar("T")


class Checkpoints:
    """Named checkpoints of one task, in `files` under `folder`, read back from `fallbacks` (older runs) too."""

    def __init__(self, files: DatastoreFiles, folder: str, fallbacks: Sequence[str] = ()):
        self.files, self.folder, self.fallbacks = files, folder, tuple(fallbacks)
        self.loaded: list[str] = []  # names read back instead of computed
        self.saved: list[str] = []  # names computed and saved by this task

    def load(self, name: str):
        """The object saved as `name` by an earlier attempt or the origin run, else None (also where what was saved
        does not unpickle: a warning on stderr names it, and the caller recomputes and overwrites it)."""
        for folder in (self.folder, *self.fallbacks):
            path = self.files.storage.path_join(folder, name)
            data = self.files.get(path)
            if data is None:
                continue
            try:
                obj = pickle.loads(data)
            except Exception as ex:  # a class renamed or moved since it was written, or bytes that are no pickle
                print(f"warning: checkpoint {path} does not load ({type(ex).__name__}: {ex}); written by another "
                      "version of codi-attn? Recomputing it.", file=sys.stderr, flush=True)
                continue
            if folder != self.folder:
                self.files.put(self.files.storage.path_join(self.folder, name), data)
            self.loaded.append(name)
            return obj
        return None

    def save(self, name: str, obj) -> None:
        self.files.put(self.files.storage.path_join(self.folder, name), pickle.dumps(obj, pickle.HIGHEST_PROTOCOL))
        self.saved.append(name)

    def counts(self) -> dict[str, int]:
        """How many checkpoints this task read back and how many it computed and saved."""
        return {"loaded": len(self.loaded), "computed": len(self.saved)}


def remembered(checkpoints: Checkpoints | None, name: str, compute: Callable[[], T],
               redo: Callable[[T], T | None] | None = None) -> T:
    """`compute()`, or what an earlier attempt saved as `name` (saved now where it was computed). With `redo`, what
    is read back goes through it: what it returns instead of None (the object with the parts that had failed
    computed again) is saved in its place and counts as computed as well as read back."""
    if checkpoints is None:
        return compute()
    saved = checkpoints.load(name)
    if saved is None:
        saved = compute()
    elif redo is None or (again := redo(saved)) is None:
        return saved
    else:
        saved = again
    checkpoints.save(name, saved)
    return saved


def fingerprint(*inputs) -> str:
    """16 hex digits of sha256 over the inputs' JSON (tuples as lists, other objects as their str)."""
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def problem_content(problems: Sequence[dict]) -> list[list[str]]:
    """What checkpoints are keyed on for a task's problems: each one's id, question and gold (a problem whose text
    or gold changed under the same id is another problem)."""
    return [[p["id"], p["question"], p["answer"]] for p in problems]


def task_checkpoints(flow, *inputs) -> Checkpoints:
    """The checkpoints of the running task of `flow` (inside a step), keyed by run, step, foreach index and the
    fingerprint of `inputs`."""
    from metaflow import current

    files = task_files(flow)
    key = f"{flow.index if flow.index is not None else 'task'}-{fingerprint(*inputs)}"

    def folder(run_id: str) -> str:
        return files.path("checkpoints", str(run_id), current.step_name, key)

    origin = current.origin_run_id
    return Checkpoints(files, folder(current.run_id), [folder(origin)] if origin else [])
