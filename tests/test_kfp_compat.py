"""The default `pneumonia-kfp compile` runs on every KFP backend from 2.3.0 (Kubeflow 1.9.1) to 2.17.

Each backend release compiles against Go code generated from the pipeline-spec and kubernetes-platform
protos of one commit. For each, a venv of its own (cached under .cache/kfp-compat/) holds the PyPI
kfp-pipeline-spec / kfp-kubernetes whose descriptors have the same fields, and parses the compiled
YAML there with json_format.ParseDict, unknown fields rejected (the Python twin of Go's protojson
without DiscardUnknown):

    PipelineSpec (the IR)          the API server parses it strictly on upload, every release
    PlatformSpec (the 2nd doc)     strictly too; on an error the whole document is silently dropped
    KubernetesExecutorConfig       drivers <= 2.4.0 and the workflow compiler >= 2.14 strictly
    PipelineDeploymentConfig       leniently everywhere: unknown fields are dropped, so only the
                                   resource fields that have a deprecated twin in the YAML may be unknown

Then the rules a parse cannot see, each from the release that first handles it (read in the
backends' source): producers found by display name before 2.14; no dsl.Collected of artifacts before
2.14; {{$.pipeline_job_*}} placeholders resolved from 2.5.0. What still degrades on old backends is
listed in DEGRADATIONS and documented in the README's support table.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pneumonia_kfp.pipelines.cli import main

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "kfp-compat"  # git-ignored; the first run builds the venvs (about a minute)
PROTOBUF = {4: ("4.25.9", "1.63.2"), 6: ("6.33.6", "1.76.0")}  # protobuf, googleapis-common-protos
# backend -> (kfp-pipeline-spec, kfp-kubernetes, protobuf major) with the same descriptors as its Go code
BACKENDS = {
    "2.3.0": ("0.3.0", "1.4.0", 4),
    "2.4.x": ("0.5.0", "1.4.0", 4),
    "2.5.0": ("0.7.0", "1.5.0", 4),  # 0.7.0 = 2.5.0's protos + PipelineConfig.workspace, ruled out below
    "2.14.x": ("2.14.6", "2.14.6", 6),
    "2.15.0": ("2.15.0", "2.15.0", 6),
    "2.16.x": ("2.16.0", "2.16.0", 6),
    "2.17.0": ("2.17.0", "2.17.0", 6),
}
# what the default compile uses that an older backend ignores: feature -> first backend that honours it.
# Each is in the README's "Supported Kubeflow" table; a new one must be added there and here.
DEGRADATIONS = {"parallelism_limit": (2, 4), "retry_inside_sub_dag": (2, 14)}
# resource fields kfp writes twice (new name, deprecated twin): old protos drop the new one and read the twin
TWINS = {"resourceCpuLimit": "cpuLimit", "resourceCpuRequest": "cpuRequest", "resourceMemoryLimit": "memoryLimit",
         "resourceMemoryRequest": "memoryRequest", "resourceType": "type", "resourceCount": "count"}

PROBE = r'''
import json, pathlib, sys, types
import yaml
from google.protobuf import json_format
import kfp
from kfp.pipeline_spec import pipeline_spec_pb2 as ps
# kfp/kubernetes/__init__.py needs the kfp SDK, which is not here: load its generated module alone
stub = types.ModuleType("kfp.kubernetes")
stub.__path__ = [str(next(pathlib.Path(p) / "kubernetes" for p in kfp.__path__
                          if (pathlib.Path(p) / "kubernetes").is_dir()))]
sys.modules["kfp.kubernetes"] = stub
from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s


def strict(message, doc):
    try:
        json_format.ParseDict(doc, message(), ignore_unknown_fields=False)
        return None
    except json_format.ParseError as e:
        return str(e).splitlines()[0]


def unknown(desc, value, path, out):
    """Every key the descriptor does not know (ParseDict stops at the first)."""
    if desc.full_name.startswith("google.protobuf.") or not isinstance(value, dict):
        return
    fields = {f.json_name: f for f in desc.fields} | {f.name: f for f in desc.fields}
    for key, v in value.items():
        f = fields.get(key)
        if f is None:
            out.append(f"{path}.{key}")
        elif f.message_type is not None and f.message_type.GetOptions().map_entry:
            vf = f.message_type.fields_by_name["value"]
            for mk, mv in (v.items() if vf.message_type is not None and isinstance(v, dict) else ()):
                unknown(vf.message_type, mv, f"{path}.{key}[{mk}]", out)
        elif f.message_type is not None and isinstance(v, list):
            for i, item in enumerate(v):
                unknown(f.message_type, item, f"{path}.{key}[{i}]", out)
        elif f.message_type is not None:
            unknown(f.message_type, v, f"{path}.{key}", out)


ir, platform = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
deploy_unknown = []
unknown(ps.PipelineDeploymentConfig.DESCRIPTOR, ir["deploymentSpec"], "deploymentSpec", deploy_unknown)
print(json.dumps({
    "ir": strict(ps.PipelineSpec, ir), "platform": strict(ps.PlatformSpec, platform),
    "executors": {name: strict(k8s.KubernetesExecutorConfig, c) for name, c in executors.items()},
    "deploy_unknown": deploy_unknown,
}))
'''


def venv(backend: str) -> Path:
    """The backend's venv, made once: its spec packages and nothing of kfp's SDK."""
    spec, kubernetes, major = BACKENDS[backend]
    protobuf, common_protos = PROTOBUF[major]
    path = CACHE / f"ps{spec}-k8s{kubernetes}-pb{protobuf}"
    if not (path / ".ok").exists():
        # no pip inside (faster, no ensurepip): this environment's pip installs into it
        subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(path)], check=True)
        subprocess.run([sys.executable, "-m", "pip", "--python", str(path / "bin" / "python"), "install", "--quiet",
                        "--disable-pip-version-check", "--no-deps",
                        f"kfp-pipeline-spec=={spec}", f"kfp-kubernetes=={kubernetes}", f"protobuf=={protobuf}",
                        f"googleapis-common-protos=={common_protos}", "PyYAML==6.0.4"], check=True)
        (path / ".ok").touch()
    return path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("compat") / "pipeline.yaml"
    assert main(["compile", "-o", str(target)]) == 0  # the default compile, as a user makes it
    return target


@pytest.fixture(scope="module")
def docs(pipeline):
    return [d for d in yaml.safe_load_all(pipeline.read_text()) if d]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_every_document_parses_strictly_with_the_backends_protos(backend, pipeline, docs):
    result = subprocess.run([str(venv(backend) / "bin" / "python"), "-c", PROBE, str(pipeline)],
                            capture_output=True, text=True, check=True)
    probe = json.loads(result.stdout)
    assert probe["ir"] is None, f"{backend}: the API server refuses the upload: {probe['ir']}"
    assert probe["platform"] is None, f"{backend}: the platform spec is dropped: {probe['platform']}"
    assert {name: e for name, e in probe["executors"].items() if e} == {}, f"{backend}: executor configs rejected"
    ir = docs[0]
    for path in probe["deploy_unknown"]:  # dropped by the lenient parse: only where a twin carries the value
        *parents, field = path.split(".")
        node = ir
        for part in parents:
            node = node[part.split("[")[0]] if "[" not in part else node[part.split("[")[0]][part[:-1].split("[")[1]]
        assert field in TWINS and TWINS[field] in node, f"{backend} loses {path}"
    if backend == "2.5.0":  # kfp-pipeline-spec 0.7.0 knows PipelineConfig.workspace; 2.5.0 does not
        assert "workspace" not in docs[1]["platforms"]["kubernetes"].get("pipelineConfig", {})
    print(f"{backend:7} kfp-pipeline-spec {BACKENDS[backend][0]:7} kfp-kubernetes {BACKENDS[backend][1]:7} "
          f"IR ok, platform ok, {len(probe['executors'])} executor configs ok, deploymentSpec drops "
          f"{len(probe['deploy_unknown'])} field(s) with deprecated twins")


def dags(ir: dict) -> list[tuple[str, dict]]:
    return [("root", ir["root"]["dag"])] + [(n, c["dag"]) for n, c in ir["components"].items() if "dag" in c]


def features(ir: dict) -> dict[str, list[str]]:
    """What the YAML uses that some backend cannot run or ignores (each keyed like DEGRADATIONS)."""
    found = {"display_name": [], "collected_artifacts": [], "job_placeholder": [], "parallelism_limit": [],
             "retry_inside_sub_dag": []}
    for dag_name, dag in dags(ir):
        for key, task in dag.get("tasks", {}).items():
            if task.get("taskInfo", {}).get("name", key) != key:
                found["display_name"].append(key)
            if task.get("iteratorPolicy", {}).get("parallelismLimit"):
                found["parallelism_limit"].append(key)
            if "retryPolicy" in task and dag_name != "root":
                found["retry_inside_sub_dag"].append(key)
    for name, component in ir["components"].items():
        for output, spec in component.get("outputDefinitions", {}).get("artifacts", {}).items():
            if "dag" in component and spec.get("isArtifactList"):
                found["collected_artifacts"].append(f"{name}.{output}")
    found["job_placeholder"] = sorted({p for p in ("{{$.pipeline_job_", "{{$.pipeline_task_") if p in json.dumps(ir)})
    return {k: v for k, v in found.items() if v}


def test_nothing_a_backend_from_2_3_cannot_run(docs):
    """Display names on producers and Collected artifacts fail before 2.14 ("cannot find producer
    task", #10371; #11725); job placeholders are resolved from 2.5.0 on; the rest only degrades."""
    found = features(docs[0])
    assert set(found) <= set(DEGRADATIONS), {k: v for k, v in found.items() if k not in DEGRADATIONS}
    # and those that degrade are what the README documents: ParallelFor(parallelism=...) on train
    # (all iterations at once before 2.4.0) and retries of train inside the sub-pipeline (none before 2.14)
    assert found == {"parallelism_limit": ["for-loop-1"], "retry_inside_sub_dag": ["train-op"]}


def test_the_feature_checks_see_what_they_look_for(docs):
    """The rules above on a pipeline that breaks each one."""
    ir = json.loads(json.dumps(docs[0]))
    ir["root"]["dag"]["tasks"]["ingest-op"]["taskInfo"]["name"] = "Ingest"
    ir["components"]["comp-train-and-evaluate"].setdefault("outputDefinitions", {})["artifacts"] = {
        "results": {"artifactType": {"schemaTitle": "system.Artifact"}, "isArtifactList": True}}
    ir["root"]["dag"]["tasks"]["start-op"]["inputs"]["parameters"]["storage"] = {
        "runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}
    found = features(ir)
    assert found["display_name"] == ["ingest-op"]
    assert found["collected_artifacts"] == ["comp-train-and-evaluate.results"]
    assert found["job_placeholder"] == ["{{$.pipeline_job_"]


def test_the_strict_parse_rejects_what_kfp_writes_unstripped(docs, tmp_path):
    """kfp-kubernetes 2.17 writes optional: false and a secretNameParameter next to secretName: the
    2.3.0 driver's protos reject both (the reason the compile strips them)."""
    ir, platform = json.loads(json.dumps(docs))
    [secret] = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train-op"]["secretAsEnv"]
    secret.update(optional=False, secretNameParameter={"runtimeValue": {"constant": secret["secretName"]}})
    target = tmp_path / "unstripped.yaml"
    target.write_text(yaml.safe_dump_all([ir, platform]))
    result = subprocess.run([str(venv("2.3.0") / "bin" / "python"), "-c", PROBE, str(target)],
                            capture_output=True, text=True, check=True)
    errors = json.loads(result.stdout)["executors"]
    assert "SecretAsEnv" in errors["exec-train-op"] and not errors["exec-ingest-op"]
