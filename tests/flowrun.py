"""Running AttentionFlow from the tests: metaflow.Runner in a datastore of its own, read back through the Client
API (the flow tests and the export tests share one clean run: the `clean_run` fixture of conftest.py)."""
from __future__ import annotations

import os
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOW_FILE = ROOT / "flows" / "attention_flow.py"
N, SHARD = 6, 4  # two shards: 4 + 2 problems
S3_BUCKET = "codi-attn-tests"  # on the test S3 server (conftest.py's s3_server)


DEMO_PARAMS = {"n_problems": "6", "shard_size": 3, "batch_size": 1, "n_boot": 20, "heads": False,
               "thought_analysis": False, "validate_group_size": 10}  # the demo run of the tests: 2 shards of 3 batches


def run_flow(root: Path, *, resume: bool = False, env: dict | None = None, options: dict | None = None, **params):
    """Run (or resume) the flow in the datastore under `root` (the local metadata, and the artifacts unless `env`
    names another datastore); `options` are Metaflow's top-level options (datastore, decospecs for --with).
    Returns the ExecutingRun."""
    from metaflow import Runner

    root.mkdir(parents=True, exist_ok=True)
    full_env = {"METAFLOW_DATASTORE_SYSROOT_LOCAL": str(root), "USERNAME": os.environ["USERNAME"],
                "CODI_ATTN_FAIL_SHARD": "", "CODI_ATTN_FAIL_PROBLEMS": "", **(env or {})}
    with Runner(str(FLOW_FILE), show_output=False, env=full_env, cwd=str(root), pylint=False,
                **(options or {})) as runner:
        result = runner.resume(**params) if resume else runner.run(**params)
        result.stdout_text, result.stderr_text = result.stdout, result.stderr
    use_datastore(root)
    return result


def use_datastore(root: Path) -> None:
    """Point this process's Client API at the datastore under `root`."""
    from metaflow import metadata, namespace

    metadata(f"local@{root}")
    namespace(None)


def tiny_params(base, ckpt, dataset, **extra):
    return {"model": "gpt2", "base": str(base), "ckpt": str(ckpt), "dataset": str(dataset),
            "n_problems": str(N), "shard_size": SHARD, "batch_size": 3, "max_new_tokens": 4, "device": "cpu",
            "dtype": "float32", "n_boot": 10, "validate_k": 2, "validate_random": 1, "head_random_sets": 4, **extra}


def card_data(task) -> str:
    """The JSON text of a task's first card."""
    from metaflow.cards import get_cards

    return card_text(get_cards(task)[0].get(), task.pathspec)


def card_text(html: str, where: str) -> str:
    """The JSON text a card's HTML embeds base64-encoded."""
    import base64
    import re

    blobs = re.findall(r'window\.__MF_DATA__\["[^"]+"\] = "([^"]+)"', html)
    assert blobs, f"no card data in the card of {where}"
    return "".join(base64.b64decode(b).decode("utf-8") for b in blobs)


def seed42_ids(n: int) -> list[str]:
    random.seed(42)
    return [f"train_{i}" for i in sorted(random.sample(range(7473), n))]


def s3_client(env: dict):
    """A boto3 S3 client on the S3 server that `env` points Metaflow at (conftest.py's s3_server)."""
    import boto3

    return boto3.client("s3", endpoint_url=env["METAFLOW_S3_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
