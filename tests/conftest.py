"""Shared fixtures: tiny CODI models in the release layout, built once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("USERNAME", "codi-attn-tests")  # Metaflow refuses to run as root without it

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GSM8K_PLACES = (SHARED / "data" / "gsm8k" / "train.jsonl", Path("/work/shared/data/gsm8k/train.jsonl"))
GSM8K_TRAIN_SIZE = 7473


def _share_the_cores() -> None:
    """Under pytest-xdist (the README's test command), each worker's torch, and the flow runs it starts, take
    its share of the cores: two workers each running 2-thread torch on 2 cores made some tests 7x slower."""
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if count > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // count))  # read when torch is imported, after this


_share_the_cores()

FIRST = ("test_flow.py", "test_s3.py")  # the modules with the longest flow runs: each makes one shared run first


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """FIRST's modules first, the rest in their order: with `--dist loadscope --no-loadscope-reorder` xdist hands
    out modules in this order, so two workers start the two shared runs side by side and nobody waits for them."""
    items.sort(key=lambda item: FIRST.index(item.path.name) if item.path.name in FIRST else len(FIRST))


def shared_once(tmp_path_factory, name: str, make) -> dict:
    """`make(root)` (a JSON-able dict) computed once per test session, under `root` = the session's temporary
    folder / name: with pytest-xdist, by the first worker that asks while the others wait on a file lock, then
    read back from name.json. A `make` that raises leaves nothing, so the next worker tries again."""
    import json

    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the folder all workers' temporary folders are in
    done = base / f"{name}.json"
    with FileLock(str(base / f"{name}.lock")):
        if not done.exists():
            done.write_text(json.dumps(make(base / name)))
    return json.loads(done.read_text())


@pytest.fixture(scope="session")
def gsm8k_train(tmp_path_factory) -> Path:
    """GSM8K's train.jsonl from ../shared; where that is missing (a user's clone), a stand-in of as many
    GSM8K-format records from the demo task, so that every test still runs (the ids of a sample depend only
    on the number of records). In CI (CI=true) the real file must be there."""
    real = next((p for p in GSM8K_PLACES if p.is_file()), None)
    if real is not None:
        return real
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI runs on the real GSM8K train file, expected at {GSM8K_PLACES[0]}")
    import json

    from codi_attn.demo.task import train_stream

    path = tmp_path_factory.mktemp("gsm8k_stand_in") / "train.jsonl"
    stream = train_stream(seed=0)
    path.write_text("".join(json.dumps(next(stream)) + "\n" for _ in range(GSM8K_TRAIN_SIZE)))
    return path


@pytest.fixture(scope="session")
def real_gsm8k(gsm8k_train) -> Path:
    """The real GSM8K train file, for the few tests that read its content; skipped (with the reason) only
    outside CI, where gsm8k_train already failed without it."""
    if gsm8k_train.parent.name.startswith("gsm8k_stand_in"):
        pytest.skip(f"needs GSM8K's own records at {GSM8K_PLACES[0]} (a stand-in is used elsewhere)")
    return gsm8k_train


@pytest.fixture(scope="session")
def clean_run(tiny_gpt2, gsm8k_train, tmp_path_factory):
    """One uninterrupted gpt2 flow run per test session (shared_once), shared by test_flow.py, test_export.py and
    others: (Run, datastore root, (base, ckpt) of the tiny model it ran, the same weights as tiny_gpt2's)."""
    from metaflow import Run

    from flowrun import run_flow, tiny_params, use_datastore

    def make(root: Path) -> dict:
        result = run_flow(root, **tiny_params(*tiny_gpt2, gsm8k_train))
        assert result.status == "successful", result.stdout_text[-3000:] + result.stderr_text[-3000:]
        return {"run": result.run.pathspec, "root": str(root), "model": [str(p) for p in tiny_gpt2]}

    made = shared_once(tmp_path_factory, "clean_ds", make)
    use_datastore(Path(made["root"]))
    return Run(made["run"]), Path(made["root"]), tuple(Path(p) for p in made["model"])


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """One default run per test session (shared_once): the offline demo model on the bundled synthetic set
    (DEMO_PARAMS: two shards of three batches, validated, no head analysis), offline: (Run, datastore root). The
    S3 test's uninterrupted reference."""
    from metaflow import Run

    from flowrun import DEMO_PARAMS, run_flow, use_datastore

    def make(root: Path) -> dict:
        result = run_flow(root, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, **DEMO_PARAMS)
        assert result.status == "successful", result.stdout_text[-3000:] + result.stderr_text[-3000:]
        assert "DEMO MODEL" in result.stdout_text  # the banner
        return {"run": result.run.pathspec, "root": str(root)}

    made = shared_once(tmp_path_factory, "demo_ds", make)
    use_datastore(Path(made["root"]))
    return Run(made["run"]), Path(made["root"])


@pytest.fixture(scope="session")
def s3_server():
    """An S3 server on 127.0.0.1 (moto's, started here and stopped at the end of the session) with one bucket, and
    the environment that points Metaflow's S3 datastore at it."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] (requirements.txt) is not installed")
    import logging
    import socket

    from flowrun import S3_BUCKET, s3_client

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request in a failing test's log
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"METAFLOW_DEFAULT_DATASTORE": "s3", "METAFLOW_DATASTORE_SYSROOT_S3": f"s3://{S3_BUCKET}/metaflow",
           "METAFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        s3_client(env).create_bucket(Bucket=S3_BUCKET)
        yield env
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> tuple[Path, Path]:
    """(base_dir, ckpt_dir) of a tiny GPT-2-style CODI with LoRA, saved as pytorch_model.bin."""
    from codi_attn.fixtures import build_tiny_codi

    return build_tiny_codi(tmp_path_factory.mktemp("tiny_gpt2"), "gpt2", seed=0)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> tuple[Path, Path]:
    """(base_dir, ckpt_dir) of a tiny LLaMA-style CODI (GQA, BOS) with LoRA, saved as model.safetensors."""
    from codi_attn.fixtures import build_tiny_codi

    return build_tiny_codi(tmp_path_factory.mktemp("tiny_llama"), "llama", seed=1, fmt="safetensors")


@pytest.fixture
def hub_cache(tiny_gpt2, tmp_path, monkeypatch) -> tuple[Path, str]:
    """A local Hugging Face hub cache (the layout huggingface_hub writes) holding the tiny GPT-2 as two repos,
    codi-test/base and codi-test/ckpt, at one revision; huggingface_hub looks there (HF_HUB_CACHE) for this
    test. Returns (cache dir, revision). The cache knows codi-test/ckpt has no model.safetensors."""
    import shutil

    from huggingface_hub import constants

    cache, revision = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    for repo, src in (("base", tiny_gpt2[0]), ("ckpt", tiny_gpt2[1])):
        folder = cache / f"models--codi-test--{repo}"
        shutil.copytree(src, folder / "snapshots" / revision)
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(revision)
    no_exist = cache / "models--codi-test--ckpt" / ".no_exist" / revision
    no_exist.mkdir(parents=True)
    (no_exist / "model.safetensors").write_text("")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache, revision


@pytest.fixture(scope="session")
def gpt2_model(tiny_gpt2):
    from codi_attn.model import load_codi

    base, ckpt = tiny_gpt2
    return load_codi("gpt2", base=str(base), ckpt=str(ckpt), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def llama_model(tiny_llama):
    from codi_attn.model import load_codi

    base, ckpt = tiny_llama
    return load_codi("llama", base=str(base), ckpt=str(ckpt), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def unpacked_models(tiny_gpt2, tiny_llama) -> dict:
    """{family: the tiny model with PyTorch's linear layers}: readable `.weight`s, copyable (the loader's
    default packs them for oneDNN on CPU float32)."""
    from codi_attn.model import load_codi

    return {family: load_codi(family, base=str(base), ckpt=str(ckpt), device="cpu", dtype="float32", prepack=False)
            for family, (base, ckpt) in (("gpt2", tiny_gpt2), ("llama", tiny_llama))}


@pytest.fixture(params=["gpt2", "llama"])
def any_model(request):
    """Each tiny model family in turn."""
    return request.getfixturevalue(f"{request.param}_model")


@pytest.fixture
def small_disk(tmp_path):
    """mount(size, read_only=False) -> a folder on a tmpfs of `size` (e.g. '2m'), unmounted after the test: a disk
    that fills up or cannot be written, for real. Mounting needs root; elsewhere the test is skipped, saying so."""
    import subprocess

    mounted = []

    def mount(size: str, read_only: bool = False) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                              text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a {size} tmpfs (needs root): {proc.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "--lazy", str(where)], check=True)
