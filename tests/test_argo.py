"""AttentionFlow compiled for Argo Workflows, without a cluster: `argo-workflows create --only-json` with the README's
configuration (its "Scaling out" exports, pointed at the test S3 server of conftest.py's s3_server, where the code
package goes) gives a WorkflowTemplate whose GPU steps request one GPU, whose foreach steps fan out over the
branches their parent step makes, whose analyses run only where a switch chose them, whose parameters are the
flow's with their defaults, and whose code package, read back from S3, carries codi_attn/ (with the demo model),
cards/ and the flow file byte for byte."""
from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile

import pytest

from flowrun import FLOW_FILE, ROOT, s3_client

GPU_STEPS = {"extract", "attribute_heads", "scan_heads", "test_held_out", "analyse_thoughts", "validate_conditions"}
FOREACH = [("sample", "shards", "extract", "aggregate"), ("attribute_heads", "head_groups", "scan_heads", "join_scan"),
           ("plan_held_out", "held_out_groups", "test_held_out", "join_heads"),
           ("plan_thoughts", "thought_groups", "analyse_thoughts", "join_thoughts"),
           ("plan_validation", "validation_groups", "validate_conditions", "validate_heads")]  # parent, var, body, join


def readme_exports() -> dict[str, str]:
    """NAME -> value of the `export` lines in the README's "Scaling out" section: the configuration a user sets."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Scaling out", 1)[1].split("\n## ", 1)[0]
    exports = dict(re.findall(r"^export (METAFLOW_\w+)=(\S+)", section, flags=re.M))
    assert exports, "README.md: no `export METAFLOW_...=` lines under '### Scaling out'"
    return exports


def flow_parameters() -> dict[str, str]:
    """The flow file's parameters (its `Parameter(name, default=...)` calls), name -> default as JSON (how Argo
    Workflows carries them)."""
    calls = [node for node in ast.walk(ast.parse(FLOW_FILE.read_text())) if isinstance(node, ast.Call)
             and getattr(node.func, "id", None) == "Parameter"]
    return {ast.literal_eval(c.args[0]): json.dumps(ast.literal_eval(next(k.value for k in c.keywords
                                                                          if k.arg == "default"))) for c in calls}


def project_files() -> dict[str, str]:
    """sha256 of every file of the checkout's codi_attn/ and cards/ (no bytecode), by path, and of the flow file."""
    paths = [p for package in ("codi_attn", "cards") for p in (ROOT / package).rglob("*")
             if p.is_file() and p.suffix != ".pyc" and "__pycache__" not in p.parts]
    files = {str(p.relative_to(ROOT)): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    return {**files, "attention_flow.py": hashlib.sha256(FLOW_FILE.read_bytes()).hexdigest()}


@pytest.fixture(scope="module")
def workflow(s3_server, tmp_path_factory):
    """The compiled WorkflowTemplate (JSON) and the README's configuration it was compiled with."""
    pytest.importorskip("kubernetes", reason="the kubernetes package (requirements.txt) is not installed")
    config = readme_exports()
    local = {"METAFLOW_DATASTORE_SYSROOT_S3": s3_server["METAFLOW_DATASTORE_SYSROOT_S3"],  # the test's bucket
             "METAFLOW_SERVICE_URL": "http://127.0.0.1:9/api"}  # not contacted by --only-json
    root = tmp_path_factory.mktemp("argo")
    env = {**os.environ, **s3_server, **config, **local, "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(root)}
    proc = subprocess.run([sys.executable, str(FLOW_FILE), "argo-workflows", "create", "--only-json"], env=env,
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):]), config


def templates(workflow_json: dict) -> dict[str, dict]:
    return {t["name"]: t for t in workflow_json["spec"]["templates"]}


def name(step: str) -> str:
    """A step's template name (Argo's names have dashes)."""
    return step.replace("_", "-")


def test_pods_request_gpus_with_the_readme_configuration(workflow):
    wf, config = workflow
    steps = templates(wf)
    assert wf["kind"] == "WorkflowTemplate" and wf["metadata"]["namespace"] == config["METAFLOW_KUBERNETES_NAMESPACE"]
    pods = {n: t for n, t in steps.items() if "metaflow/step_name" in t.get("metadata", {}).get("annotations", {})}
    assert {t["metadata"]["annotations"]["metaflow/step_name"] for t in pods.values()} == {
        "start", "sample", *GPU_STEPS, "aggregate", "metrics", "join_scan", "plan_held_out", "join_heads",
        "after_heads", "plan_thoughts", "join_thoughts", "after_thoughts", "plan_validation",
        "validate_heads", "compare", "end"}
    for n, t in pods.items():
        c = t["container"]
        step = t["metadata"]["annotations"]["metaflow/step_name"]
        assert c["image"] == config["METAFLOW_KUBERNETES_CONTAINER_IMAGE"], n
        assert t["serviceAccountName"] == config["METAFLOW_KUBERNETES_SERVICE_ACCOUNT"], n
        gpu = c["resources"]["limits"].get("nvidia.com/gpu")
        if step in GPU_STEPS:
            assert gpu == "1" and c["resources"]["requests"]["memory"] == "32000.0M", n
        else:
            assert gpu is None, n
        command = c["command"][-1]
        assert "--datastore=s3" in command and "--metadata=service" in command, n
        assert f"step {step} " in command, n


def test_foreach_steps_fan_out_and_join(workflow):
    wf, _ = workflow
    steps = templates(wf)
    dag = {t["name"]: t for t in steps["AttentionFlow"]["dag"]["tasks"]}
    for parent, var, body, join in FOREACH:
        fan = dag[f"{name(parent)}-foreach-{name(var)}"]
        assert fan["withParam"] == f"{{{{tasks.{name(parent)}.outputs.parameters.num-splits}}}}", parent
        assert fan["depends"] == f"{name(parent)}.Succeeded", parent
        assert [t["template"] for t in steps[fan["template"]]["dag"]["tasks"]] == [name(body)], parent
        assert dag[name(join)]["depends"] == f"{fan['name']}.Succeeded", join


def test_switches_choose_the_next_analysis(workflow):
    """metrics, after_heads and after_thoughts choose the next analysis (the flow's switches): the first step of each
    analysis, and compare, run only when one of the switches that can lead there chose it."""
    wf, _ = workflow
    dag = {t["name"]: t for t in templates(wf)["AttentionFlow"]["dag"]["tasks"]}
    chosen_by = {"attribute_heads": ["metrics"], "plan_thoughts": ["after_heads", "metrics"],
                 "plan_validation": ["after_heads", "after_thoughts", "metrics"],
                 "compare": ["after_heads", "after_thoughts", "metrics"]}
    for target, switches in chosen_by.items():
        when = dag[name(target)]["when"]
        for switch in switches:
            assert f"tasks['{name(switch)}'].outputs.parameters['switch-step'] : nil) == '{target}'" in when, target
        assert sorted(re.findall(r"tasks\['([\w-]+)'\]\.outputs", when)) == [name(s) for s in switches], target
    assert dag["after-heads"]["depends"] == "join-heads.Succeeded" and dag["after-heads"].get("when") is None


def test_parameters_are_the_flows_with_their_defaults(workflow):
    wf, _ = workflow
    given = {p["name"]: p["value"] for p in wf["spec"]["arguments"]["parameters"]}
    assert given == flow_parameters()
    assert given["model"] == '"demo"' and given["shard_size"] == "50" and given["validate"] == "true"


def test_code_package_carries_the_project(workflow, s3_server):
    wf, _ = workflow
    env = {v["name"]: v.get("value") for v in templates(wf)["extract"]["container"]["env"]}
    bucket, key = env["METAFLOW_CODE_URL"].removeprefix("s3://").split("/", 1)
    blob = s3_client(s3_server).get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hashlib.sha1(blob).hexdigest() == env["METAFLOW_CODE_SHA"]
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        shipped = {m.name: hashlib.sha256(tar.extractfile(m).read()).hexdigest() for m in tar.getmembers()
                   if m.isfile() and not m.name.startswith(".mf_")}  # .mf_*: Metaflow's own code and metadata
    assert shipped == project_files()
    weights = {p for p in shipped if p.startswith("codi_attn/demo/weights/")}
    assert {"codi_attn/demo/weights/base/config.json", "codi_attn/demo/weights/base/tokenizer.json"} <= weights
    assert any(p.startswith("codi_attn/demo/weights/ckpt/") for p in weights)
