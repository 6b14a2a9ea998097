"""Files of codi-attn's own in the run's Metaflow datastore (local folder, S3, ...), beside the artifacts: the
mid-task checkpoints (codi_attn.checkpoints) and the cached model files (codi_attn.model_cache).

One small interface over Metaflow's datastore storage (`DataStoreStorage`: the same object Metaflow writes the
artifacts with), so that both work wherever the run's datastore is. Paths are relative to the datastore root,
under `<flow>/codi_attn/...`: no Metaflow object (run, step, task) lives there.
"""
from __future__ import annotations

import io
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = "codi_attn"


class DatastoreFiles:
    """Bytes under `<flow>/codi_attn/` in a datastore storage."""

    def __init__(self, storage, flow_name: str):
        self.storage, self.flow_name = storage, flow_name

    def path(self, *parts: str) -> str:
        return self.storage.path_join(self.flow_name, ROOT, *parts)

    def exists(self, path: str) -> bool:
        return bool(self.storage.is_file([path])[0])

    def put(self, path: str, data: bytes) -> None:
        self.storage.save_bytes([(path, io.BytesIO(data))], overwrite=True)

    def put_file(self, path: str, file: Path) -> None:
        with open(file, "rb") as f:
            self.storage.save_bytes([(path, f)], overwrite=True)

    def get(self, path: str) -> bytes | None:
        """The bytes at `path`, or None where there is nothing."""
        with self.storage.load_bytes([path]) as loaded:
            for _, local, _ in loaded:
                return None if local is None else Path(local).read_bytes()
        return None

    @contextmanager
    def folder(self, paths: Sequence[str], names: Sequence[str], dest: Path) -> Iterator[Path]:
        """The files at `paths` under `names` in the folder `dest`, while the context lasts (linked where the storage
        hands out files that live as long, copied otherwise); KeyError naming the first path missing."""
        dest.mkdir(parents=True, exist_ok=True)
        with self.storage.load_bytes(list(paths)) as loaded:
            found = {path: local for path, local, _ in loaded}
            for path, name in zip(paths, names):
                if found.get(path) is None:
                    raise KeyError(f"{path} is not in the datastore at {self.storage.datastore_root}")
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    target.symlink_to(found[path])
                except OSError:
                    shutil.copyfile(found[path], target)
            yield dest


def task_files(flow) -> DatastoreFiles:
    """The datastore files of the running task of `flow` (a FlowSpec inside a step), in the storage Metaflow writes
    its artifacts with (which it exposes to steps only through the task's private datastore attribute)."""
    from metaflow import current

    return DatastoreFiles(flow._datastore.parent_datastore._storage_impl, current.flow_name)
