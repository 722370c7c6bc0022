"""Each kustomize overlay renders, every object validates offline, and the overlay's pipeline
settings point at what the overlay deploys."""
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pneumonia_kfp.pipelines.settings import load

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
BASE = {("ServiceAccount", "pneumonia-kfp-submitter"), ("RoleBinding", "pneumonia-kfp-submitter"),
        ("ConfigMap", "pneumonia-kfp-settings"), ("Service", "pneumonia-kfp-pushgateway"),
        ("Deployment", "pneumonia-kfp-pushgateway"), ("ConfigMap", "pneumonia-kfp-pushgateway-scrape-config")}
OBJECTS = {
    "kubeflow-minio": BASE,  # Kubeflow's own Secret mlpipeline-minio-artifact: the example is left out
    "standalone-minio": BASE | {("Secret", "pneumonia-kfp-minio"), ("PersistentVolumeClaim", "pneumonia-kfp-minio"),
                                ("Deployment", "pneumonia-kfp-minio"), ("Service", "pneumonia-kfp-minio")},
}


def render(overlay: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(MANIFESTS / "overlays" / overlay)],
                         capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(objects, kind, name) -> dict:
    return next(o for o in objects if (o["kind"], o["metadata"]["name"]) == (kind, name))


@pytest.mark.parametrize("overlay", sorted(OBJECTS))
def test_overlay_renders_and_validates(overlay):
    objects = render(overlay)
    assert {(o["kind"], o["metadata"]["name"]) for o in objects} == OBJECTS[overlay]
    for o in objects:
        kubernetes_validate.validate(o, kubernetes_validate.latest_version(), strict=True)  # raises when invalid
        assert o["metadata"]["namespace"] == "kubeflow"
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "pneumonia-kfp"
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        for c in deployment["spec"]["template"]["spec"]["containers"]:
            assert ":" in c["image"] and not c["image"].endswith(":latest")
            assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    binding = find(objects, "RoleBinding", "pneumonia-kfp-submitter")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "pneumonia-kfp-submitter", "namespace": "kubeflow"}]


@pytest.mark.parametrize("overlay", sorted(OBJECTS))
def test_overlay_settings_match_what_it_deploys(overlay):
    objects = render(overlay)
    text = find(objects, "ConfigMap", "pneumonia-kfp-settings")["data"]["pipeline-settings.yaml"]
    assert text == (MANIFESTS / "overlays" / overlay / "pipeline-settings.yaml").read_text()
    settings = load(str(MANIFESTS / "overlays" / overlay / "pipeline-settings.yaml"), environ={})

    gateway = find(objects, "Service", "pneumonia-kfp-pushgateway")
    assert settings.env["PNEUMONIA_KFP_PUSHGATEWAY"] == \
        f"{gateway['metadata']['name']}.{gateway['metadata']['namespace']}:{gateway['spec']['ports'][0]['port']}"
    if overlay == "standalone-minio":
        secret = find(objects, "Secret", settings.minio.secret)
        assert {settings.minio.access_key_key, settings.minio.secret_key_key} == set(secret["stringData"])
        minio = find(objects, "Service", "pneumonia-kfp-minio")
        assert settings.minio.endpoint == f"pneumonia-kfp-minio.{minio['metadata']['namespace']}:9000"
        env = find(objects, "Deployment", "pneumonia-kfp-minio")["spec"]["template"]["spec"]["containers"][0]["env"]
        assert {e["valueFrom"]["secretKeyRef"]["name"] for e in env} == {settings.minio.secret}
    else:  # Kubeflow's own MinIO and Secret, which live outside these manifests
        assert (settings.minio.secret, settings.minio.endpoint) == ("mlpipeline-minio-artifact",
                                                                     "minio-service.kubeflow:9000")


@pytest.mark.parametrize("overlay", sorted(OBJECTS))
def test_scrape_config_keeps_pushed_labels_of_the_pushgateway(overlay):
    objects = render(overlay)
    config = find(objects, "ConfigMap", "pneumonia-kfp-pushgateway-scrape-config")
    [entry] = yaml.safe_load(config["data"]["scrape-config.yaml"])
    assert entry["honor_labels"] is True  # keeps job/backbone labels the tasks pushed
    service = find(objects, "Service", "pneumonia-kfp-pushgateway")
    assert "pneumonia-kfp-pushgateway" in yaml.safe_dump(entry["relabel_configs"])
    assert "http" in [p["name"] for p in service["spec"]["ports"]]
