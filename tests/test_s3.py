"""AttentionFlow on an S3 datastore, as on a cluster: an S3 server on 127.0.0.1 (conftest.py's s3_server, moto's)
reached through Metaflow's own S3 client. One run of the demo model whose shard 1 is SIGKILLed after a batch, in
both its attempts (`--with retry`), then its resume: the resumed shard redoes only its last batch (the retry and the
resume each read back what the attempt before saved), and the Client API, its cards and `export` read the run back
from S3, its arrays bit for bit those of the uninterrupted local demo run (conftest.py's demo_run)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from flowrun import DEMO_PARAMS, ROOT, S3_BUCKET, card_text, run_flow, s3_client, use_datastore

ARRAYS = ("attention_raw", "attention_mass", "predictions", "correct")
READ_BACK = """
import json, sys
import numpy as np
from metaflow import Run, metadata, namespace
from metaflow.cards import get_cards
from codi_attn.__main__ import main
metadata("local@" + sys.argv[1]); namespace(None)
failed, run = Run(sys.argv[2]), Run(sys.argv[3])
out = {"successful": run.successful, "tags": sorted(run.tags),
       "finished": [[t.data.shard_index, t.pathspec] for t in failed["extract"] if t.successful],
       "killed": [t.current_attempt for t in failed["extract"] if not t.successful],
       "ds_types": sorted({t.metadata_dict.get("ds-type") for t in run["extract"]}),
       "shards": {t.data.shard_index: [t.origin_pathspec, t.data.checkpoint_batches] for t in run["extract"]},
       "problem_ids": run.data.problem_ids, "texts": run.data.texts,
       "fingerprint": run.data.dataset_fingerprint,
       "cards": {step: [get_cards(t)[0].get() for t in run[step]] for step in ("extract", "aggregate")},
       "export": main(["export", run.id, sys.argv[5], "--no-figures"])}
np.savez(sys.argv[4], **{name: getattr(run.data, name) for name in %r})
print(json.dumps(out))
""" % (ARRAYS,)


def test_killed_shard_retried_and_resumed_on_s3(s3_server, demo_run, tmp_path):
    root = tmp_path / "s3_ds"  # the local metadata; artifacts, cards, checkpoints and the code package go to S3
    env = {**os.environ, **s3_server, "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(root)}
    params = {**DEMO_PARAMS, "validate": False}  # the validation: on the demo run
    # one worker: shard 0 finishes before shard 1 dies after its first batch, in both attempts
    failed = run_flow(root, env={**s3_server, "CODI_ATTN_FAIL_SHARD": "1:kill:after=1"}, max_workers=1,
                      options={"datastore": "s3", "decospecs": ["retry:times=1,minutes_between_retries=0"]}, **params)
    assert failed.status == "failed", failed.stderr_text[-3000:]
    resumed = run_flow(root, resume=True, env=s3_server, options={"datastore": "s3"}, origin_run_id=failed.run.id)
    assert resumed.status == "successful", resumed.stderr_text[-3000:]
    run_id = resumed.run.id

    out = tmp_path / "out"  # the export
    proc = subprocess.run([sys.executable, "-c", READ_BACK, str(root), failed.run.pathspec, resumed.run.pathspec,
                           str(tmp_path / "arrays.npz"), str(out)], env={**env, "PYTHONPATH": str(ROOT)}, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["successful"] and got["ds_types"] == ["s3"] and "model:demo" in got["tags"]
    (finished_index, finished_task), = got["finished"]  # shard 0 finished,
    assert finished_index == 0 and got["killed"] == [1]  # shard 1 was killed in its first attempt and its retry
    shards = {int(k): v for k, v in got["shards"].items()}
    assert shards[0] == [finished_task, {"loaded": 0, "computed": 3}]  # cloned from the failed run
    # batch 1 from the first attempt (read back by the retry), batch 2 from the retry, batch 3 computed now
    assert shards[1] == [None, {"loaded": 2, "computed": 1}]

    reference, reference_root = demo_run
    use_datastore(reference_root)
    ref = reference.data
    arrays = np.load(tmp_path / "arrays.npz")
    assert got["problem_ids"] == ref.problem_ids and got["texts"] == ref.texts
    for name in ARRAYS:
        np.testing.assert_array_equal(arrays[name], getattr(ref, name), err_msg=name)

    keys = [o["Key"] for page in s3_client(s3_server).get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET)
            for o in page.get("Contents", [])]
    for rid, n in ((failed.run.id, 2), (run_id, 3)):  # the resume keeps a copy of what it read back
        prefix = f"metaflow/AttentionFlow/codi_attn/checkpoints/{rid}/extract/1-"
        assert sum(k.startswith(prefix) for k in keys) == n, rid

    assert f"dataset:{got['fingerprint'][:12]}" in got["tags"]
    cards = {step: [card_text(html, f"{run_id}/{step}") for html in pages] for step, pages in got["cards"].items()}
    assert "Aggregate: 6 of 6 problems" in cards["aggregate"][0]
    # shard 1's card is the clone's, read from the failed run
    assert sorted(c.split("Extract: shard ")[1][:6] for c in cards["extract"]) == ["1 of 2", "2 of 2"]
    assert got["export"] == 0
    results = out / "results" / "demo"
    np.testing.assert_array_equal(np.load(results / "attention_raw.npy"), ref.attention_raw)
    assert json.loads((results / "summary.json").read_text())["run"] == f"AttentionFlow/{run_id}"
