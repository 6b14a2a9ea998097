"""What AttentionFlow says when the disk under its datastore fills up: one line naming the folder and what to do,
instead of Metaflow's 'Internal error' traceback. Metaflow's local datastore writes every artifact and metadata
file under a temporary name and renames it when complete, so what was stored before the disk filled stays whole
and `resume` goes on from the task that could not be stored."""
from __future__ import annotations

import errno
import sys

FULL = (errno.ENOSPC, errno.EDQUOT)


def datastore_root() -> str:
    """The local datastore folder (.metaflow) this process writes to, as Metaflow finds it."""
    from metaflow.plugins.datastores.local_storage import LocalStorage

    return LocalStorage.get_datastore_root_from_config(lambda *a, **k: None, create_on_absent=False) or ".metaflow"


def full_disk_message(e: OSError, root: str) -> str:
    """One line for a write that found no space: the file (when the system named it), the datastore, what to do."""
    what = f"writing {e.filename}" if e.filename else "writing to the datastore"
    return (f"AttentionFlow cannot go on: {e.strerror or e} {what} (datastore {root}); what was stored before is "
            f"whole. Free space on that disk (or copy {root} to a larger disk and set "
            f"METAFLOW_DATASTORE_SYSROOT_LOCAL to the folder holding the copy), then: python flows/attention_flow.py "
            f"resume")


def explain_full_disk() -> None:
    """Make this process (the flow's command line: the runtime and every task) print full_disk_message for a
    full disk instead of Metaflow's traceback; any other unexpected error is shown as Metaflow shows it."""
    from metaflow import cli

    shown = cli.print_unknown_exception

    def show(ex: BaseException) -> None:
        if isinstance(ex, OSError) and ex.errno in FULL:
            print(full_disk_message(ex, datastore_root()), file=sys.stderr, flush=True)
        else:
            shown(ex)

    cli.print_unknown_exception = show
