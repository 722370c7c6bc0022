"""Every kustomization renders with `kubectl kustomize`, every object validates strictly offline
(Kubernetes kinds with kubernetes-validate, Istio's AuthorizationPolicy against its CRD schema), and
what the objects say fits together: the overlays' settings point at what Kubeflow and the
pushgateway kustomization deploy, the pushgateway's port is open to profile namespaces, the submitter
may do what submit does and no more, and the example Job runs a command line the CLI accepts."""
import json
import os
import shlex
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pneumonia_kfp.components.kfp_defaults import IMAGE_TAG
from pneumonia_kfp.pipelines.cli import parser
from pneumonia_kfp.pipelines.settings import load

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
PROFILE = "kubeflow-user-example-com"  # the namespace Kubeflow's example profile gets
SUBMITTER = {("ServiceAccount", "pneumonia-kfp-submitter"), ("Role", "pneumonia-kfp-submitter"),
             ("RoleBinding", "pneumonia-kfp-submitter"), ("ConfigMap", "pneumonia-kfp-settings")}
GATEWAY = {("Service", "pneumonia-kfp-pushgateway"), ("Deployment", "pneumonia-kfp-pushgateway"),
           ("ConfigMap", "pneumonia-kfp-pushgateway-scrape-config"), ("NetworkPolicy", "pneumonia-kfp-pushgateway")}
# kustomization -> (namespace, objects)
RENDERS = {
    "overlays/kubeflow-minio": (PROFILE, SUBMITTER),
    "overlays/kubeflow-seaweedfs": (PROFILE, SUBMITTER),
    "overlays/standalone-minio": ("kubeflow", SUBMITTER | {
        ("Secret", "pneumonia-kfp-minio"), ("PersistentVolumeClaim", "pneumonia-kfp-minio"),
        ("Deployment", "pneumonia-kfp-minio"), ("Service", "pneumonia-kfp-minio")}),
    "pushgateway/base": ("kubeflow", GATEWAY),
    "pushgateway/kubeflow": ("kubeflow", GATEWAY | {("AuthorizationPolicy", "pneumonia-kfp-pushgateway")}),
    "submit-job": (PROFILE, {("Job", "pneumonia-kfp-submit")}),
}
# the object store of each Kubeflow release family: KFP's manifests ship MinIO's minio-service up to 2.15,
# SeaweedFS's service (S3 on 8333) from 2.16
ENDPOINTS = {"overlays/kubeflow-minio": "minio-service.kubeflow:9000",
             "overlays/kubeflow-seaweedfs": "seaweedfs.kubeflow:8333"}
CRD_SCHEMAS = {("security.istio.io/v1beta1", "AuthorizationPolicy"):
               SCHEMAS / "authorizationpolicy.security.istio.io_v1beta1.json"}


def render(path: str | Path) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(MANIFESTS / path)], capture_output=True, text=True,
                         check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(objects, kind, name) -> dict:
    return next(o for o in objects if (o["kind"], o["metadata"]["name"]) == (kind, name))


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Keys the structural schema does not declare (what `kubectl apply --validate=strict` rejects)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, dict) and "properties" in schema:
        out = [f"{path}.{k}" for k in value if k not in schema["properties"]]
        for k, v in value.items():
            if k in schema["properties"]:
                out += unknown_fields(v, schema["properties"][k], f"{path}.{k}")
        return out
    if isinstance(value, list) and "items" in schema:
        return [u for i, v in enumerate(value) for u in unknown_fields(v, schema["items"], f"{path}[{i}]")]
    return []


def validate(o: dict) -> None:
    schema_file = CRD_SCHEMAS.get((o["apiVersion"], o["kind"]))
    if schema_file is None:
        kubernetes_validate.validate(o, kubernetes_validate.latest_version(), strict=True)  # raises when invalid
        return
    schema = json.loads(schema_file.read_text())
    jsonschema.validate(o["spec"], schema["properties"]["spec"])
    assert unknown_fields(o["spec"], schema["properties"]["spec"], "spec") == []


@pytest.mark.parametrize("path", sorted(RENDERS))
def test_renders_and_validates_strictly(path):
    namespace, expected = RENDERS[path]
    objects = render(path)
    assert {(o["kind"], o["metadata"]["name"]) for o in objects} == expected
    for o in objects:
        validate(o)
        assert o["metadata"]["namespace"] == namespace
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "pneumonia-kfp"
    for workload in (o for o in objects if o["kind"] in ("Deployment", "Job")):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            assert ":" in c["image"] and not c["image"].endswith(":latest")


def test_the_strict_checks_catch_a_misspelt_field():
    policy = find(render("pushgateway/kubeflow"), "AuthorizationPolicy", "pneumonia-kfp-pushgateway")
    policy["spec"]["rules"][0]["to"][0]["operation"]["port"] = ["9091"]  # ports, misspelt
    with pytest.raises(AssertionError):
        validate(policy)
    role = find(render("overlays/kubeflow-minio"), "Role", "pneumonia-kfp-submitter")
    role["rules"][0]["verb"] = role["rules"][0].pop("verbs")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(role)


@pytest.mark.parametrize("path", sorted(ENDPOINTS) + ["overlays/standalone-minio"])
def test_submitter_may_only_submit_and_watch(path):
    objects = render(path)
    namespace = RENDERS[path][0]
    role = find(objects, "Role", "pneumonia-kfp-submitter")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    # kfp.Client in submit: list + create the experiment, create the run, get it while --wait polls
    assert granted == {("pipelines.kubeflow.org", "experiments", v) for v in ("get", "list", "create")} | {
        ("pipelines.kubeflow.org", "runs", v) for v in ("get", "create")}
    assert not {"delete", "terminate", "archive", "update", "*"} & {v for _, _, v in granted}
    binding = find(objects, "RoleBinding", "pneumonia-kfp-submitter")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "pneumonia-kfp-submitter"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pneumonia-kfp-submitter",
                                    "namespace": namespace}]
    assert find(objects, "ServiceAccount", "pneumonia-kfp-submitter")["automountServiceAccountToken"] is False


@pytest.mark.parametrize("path", sorted(ENDPOINTS) + ["overlays/standalone-minio"])
def test_overlay_settings_point_at_the_store_and_the_gateway(path):
    objects = render(path)
    text = find(objects, "ConfigMap", "pneumonia-kfp-settings")["data"]["pipeline-settings.yaml"]
    assert text == (MANIFESTS / path / "pipeline-settings.yaml").read_text()
    settings = load(str(MANIFESTS / path / "pipeline-settings.yaml"), environ={})
    assert settings.image == f"registry.example.com/pneumonia-kfp:{IMAGE_TAG}"  # the tag of this checkout

    gateway = find(render("pushgateway/base"), "Service", "pneumonia-kfp-pushgateway")
    assert settings.env["PNEUMONIA_KFP_PUSHGATEWAY"] == \
        f"{gateway['metadata']['name']}.{gateway['metadata']['namespace']}:{gateway['spec']['ports'][0]['port']}"
    if path in ENDPOINTS:  # Kubeflow's store, its bucket and the profile's own Secret
        assert settings.minio.endpoint == ENDPOINTS[path]
        assert (settings.minio.secret, settings.minio.access_key_key, settings.minio.secret_key_key) == (
            "mlpipeline-minio-artifact", "accesskey", "secretkey")
        assert settings.minio.create_bucket is False
        # the profile's keys may write mlpipeline/{artifacts,private-artifacts/<ns>,private/<ns>,shared}/* only
        assert settings.storage.format(namespace="team-a") == "s3://mlpipeline/private/team-a/pneumonia-kfp"
    else:
        secret = find(objects, "Secret", settings.minio.secret)
        assert {settings.minio.access_key_key, settings.minio.secret_key_key} == set(secret["stringData"])
        minio = find(objects, "Service", "pneumonia-kfp-minio")
        assert settings.minio.endpoint == f"pneumonia-kfp-minio.{minio['metadata']['namespace']}:9000"
        env = find(objects, "Deployment", "pneumonia-kfp-minio")["spec"]["template"]["spec"]["containers"][0]["env"]
        assert {e["valueFrom"]["secretKeyRef"]["name"] for e in env} == {settings.minio.secret}
        assert settings.minio.create_bucket is True and settings.storage.startswith("s3://pneumonia-kfp/")


def test_pushgateway_port_is_open_to_profile_namespaces():
    objects = render("pushgateway/kubeflow")
    pod = find(objects, "Deployment", "pneumonia-kfp-pushgateway")["spec"]["template"]
    port = pod["spec"]["containers"][0]["ports"][0]["containerPort"]
    policy = find(objects, "NetworkPolicy", "pneumonia-kfp-pushgateway")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    [rule] = policy["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [port]
    # Kubeflow's profile controller labels every profile namespace app.kubernetes.io/part-of=kubeflow-profile
    assert {"namespaceSelector": {"matchLabels": {"app.kubernetes.io/part-of": "kubeflow-profile"}}} in rule["from"]
    assert {"podSelector": {}} in rule["from"]  # its own namespace (standalone KFP runs there)
    authz = find(objects, "AuthorizationPolicy", "pneumonia-kfp-pushgateway")
    assert authz["spec"]["action"] == "ALLOW"
    assert authz["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    # pipeline pods have no sidecar, so no mTLS identity: the rule cannot require a source
    assert authz["spec"]["rules"] == [{"to": [{"operation": {"ports": [str(port)]}}]}]


def test_scrape_config_keeps_pushed_labels_of_the_pushgateway():
    objects = render("pushgateway/base")
    config = find(objects, "ConfigMap", "pneumonia-kfp-pushgateway-scrape-config")
    [entry] = yaml.safe_load(config["data"]["scrape-config.yaml"])
    assert entry["honor_labels"] is True  # keeps job/backbone labels the tasks pushed
    service = find(objects, "Service", "pneumonia-kfp-pushgateway")
    assert "pneumonia-kfp-pushgateway" in yaml.safe_dump(entry["relabel_configs"])
    assert "http" in [p["name"] for p in service["spec"]["ports"]]


def test_submit_job_uses_a_kfp_audience_token_and_a_valid_command_line():
    from kfp.client import KF_PIPELINES_SA_TOKEN_ENV, KF_PIPELINES_SA_TOKEN_PATH

    job = find(render("submit-job"), "Job", "pneumonia-kfp-submit")
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["serviceAccountName"] == "pneumonia-kfp-submitter" and pod["automountServiceAccountToken"] is False
    assert container["image"] == f"registry.example.com/pneumonia-kfp:{IMAGE_TAG}"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env[KF_PIPELINES_SA_TOKEN_ENV] == KF_PIPELINES_SA_TOKEN_PATH  # where kfp.Client reads it anyway
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    token_dir, token_file = KF_PIPELINES_SA_TOKEN_PATH.rsplit("/", 1)
    [source] = volumes[mounts[token_dir]]["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
    assert source["serviceAccountToken"]["path"] == token_file
    settings_dir, settings_file = env["PNEUMONIA_KFP_SETTINGS"].rsplit("/", 1)
    settings_map = volumes[mounts[settings_dir]]["configMap"]["name"]
    overlay = render("overlays/kubeflow-minio")
    assert settings_file in find(overlay, "ConfigMap", settings_map)["data"]
    assert pod["serviceAccountName"] == find(overlay, "ServiceAccount", "pneumonia-kfp-submitter")["metadata"]["name"]

    assert container["args"][0] == "pneumonia-kfp"
    argv = [a.replace("$(NAMESPACE)", PROFILE) for a in container["args"][1:]]
    args = parser().parse_args(argv)  # exits on a flag the CLI does not know
    assert (args.command, args.namespace, args.wait) == ("submit", PROFILE, True)
    assert args.host == "http://ml-pipeline-ui.kubeflow"
    assert f"data=s3://mlpipeline/private/{PROFILE}/data/chest_xray" in args.param
    assert [e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"] if e["name"] == "NAMESPACE"] == \
        ["metadata.namespace"]


@pytest.mark.parametrize("path", ["overlays/kubeflow-seaweedfs", "submit-job"])
def test_another_profile_with_kubectl_alone(tmp_path, path):
    """The README's way to another profile: a two-line kustomization, rendered by kubectl alone."""
    base = os.path.relpath(MANIFESTS / path, tmp_path)  # kustomize takes no absolute path to a base
    (tmp_path / "kustomization.yaml").write_text(f"namespace: team-a\nresources:\n  - {base}\n")
    result = subprocess.run(shlex.split(f"kubectl kustomize {tmp_path}"), capture_output=True, text=True, check=True)
    objects = [o for o in yaml.safe_load_all(result.stdout) if o]
    assert {o["metadata"]["namespace"] for o in objects} == {"team-a"}
    for binding in (o for o in objects if o["kind"] == "RoleBinding"):
        assert [s["namespace"] for s in binding["subjects"]] == ["team-a"]
