"""The compiled pipeline, read back strictly through kfp's own protobufs, carries the platform settings."""
import pytest
import yaml
from google.protobuf import json_format
from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb
from kfp.pipeline_spec import pipeline_spec_pb2 as pb

from pneumonia_kfp.pipelines.cli import main
from pneumonia_kfp.pipelines.settings import Settings, SettingsError, load

IMAGE = "registry.example.com/pneumonia-kfp:1.2.3"
EXECUTORS = {"exec-start-op", "exec-ingest-op", "exec-train-op", "exec-evaluate-op", "exec-report-op",
             "exec-deploy-op"}
# known credential values in the compiling process: none of them may reach the YAML
CREDENTIALS = {"MINIO_ACCESS_KEY": "AKIA-known-access-key", "MINIO_SECRET_KEY": "known-secret-key-value"}


def compile_spec(tmp_path, *args) -> tuple[pb.PipelineSpec, dict, str]:
    """Compile through the CLI; the IR (strict PipelineSpec), each executor's strict
    KubernetesExecutorConfig, and the YAML text."""
    target = tmp_path / "pipeline.yaml"
    assert main(["compile", "-o", str(target), *args]) == 0
    text = target.read_text()
    ir, platform = yaml.safe_load_all(text)
    spec = json_format.ParseDict(ir, pb.PipelineSpec())
    platform_spec = json_format.ParseDict(platform, pb.PlatformSpec())
    executors = platform_spec.platforms["kubernetes"].deployment_spec.executors
    k8s = {name: json_format.ParseDict(json_format.MessageToDict(config), k8s_pb.KubernetesExecutorConfig())
           for name, config in executors.items()}
    return spec, k8s, text


@pytest.fixture
def compiled(tmp_path, monkeypatch):
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    return compile_spec(tmp_path, "--image", IMAGE, "--max-parallel", "3")


def container(spec: pb.PipelineSpec, executor: str):
    return spec.deployment_spec.fields["executors"].struct_value.fields[executor].struct_value


def parse_container(spec, executor) -> pb.PipelineDeploymentConfig.PipelineContainerSpec:
    c = container(spec, executor).fields["container"].struct_value
    return json_format.ParseDict(json_format.MessageToDict(c), pb.PipelineDeploymentConfig.PipelineContainerSpec())


def loop_tasks(spec: pb.PipelineSpec):
    """The tasks inside the ParallelFor, which sits in the train-and-evaluate sub-pipeline."""
    inner = spec.components[spec.root.dag.tasks["train-and-evaluate"].component_ref.name].dag.tasks
    [loop] = [task for name, task in inner.items() if name.startswith("for-loop")]
    return loop, spec.components[loop.component_ref.name].dag.tasks


def test_parallel_for_over_backbones_with_its_parallelism(compiled):
    spec, _, _ = compiled
    # condition-1: deploy-op, only when serve_name is set (tests/test_deploy.py)
    assert set(spec.root.dag.tasks) == {"start-op", "ingest-op", "train-and-evaluate", "report-op", "condition-1"}
    loop, body = loop_tasks(spec)
    assert loop.parameter_iterator.items.input_parameter == "pipelinechannel--backbones"
    assert loop.iterator_policy.parallelism_limit == 3
    assert set(body) == {"train-op", "evaluate-op"}
    assert body["train-op"].inputs.parameters["backbone"].component_input_parameter == \
        "pipelinechannel--backbones-loop-item"


def test_fan_in_through_the_run_folder_not_collected_artifacts(compiled):
    """Backends before 2.14 cannot run dsl.Collected of artifacts: report runs after the sub-pipeline
    and reads the results from the run folder that start made (never cached, so never shared)."""
    spec, _, text = compiled
    root = spec.root.dag.tasks
    assert "isArtifactList" not in text
    assert "train-and-evaluate" in root["report-op"].dependent_tasks
    assert set(root["report-op"].inputs.artifacts) == {"dataset"}
    for inputs in (root["report-op"].inputs, root["train-and-evaluate"].inputs):
        assert inputs.parameters["run_dir"].task_output_parameter.producer_task == "start-op"
    assert not root["start-op"].caching_options.enable_cache
    _, body = loop_tasks(spec)
    assert body["evaluate-op"].inputs.parameters["run_dir"].component_input_parameter == "pipelinechannel--run_dir"


def test_no_display_names(compiled):
    """Drivers before 2.14 look a producer up by its display name: every task keeps its own name."""
    spec, _, _ = compiled
    dags = [spec.root.dag] + [c.dag for c in spec.components.values() if c.HasField("dag")]
    tasks = [(name, task) for dag in dags for name, task in dag.tasks.items()]
    assert len(tasks) == 9 and all(task.task_info.name == name for name, task in tasks)


def test_every_task_runs_the_configured_image(compiled):
    spec, _, text = compiled
    executors = spec.deployment_spec.fields["executors"].struct_value.fields
    assert set(executors) == EXECUTORS
    assert {parse_container(spec, name).image for name in executors} == {IMAGE}
    assert ":latest" not in text and "pip install" not in text  # nothing installed when a task starts


def test_train_gets_a_gpu_shm_resources_tolerations_and_retries(compiled):
    spec, k8s, _ = compiled
    resources = parse_container(spec, "exec-train-op").resources
    assert resources.accelerator.resource_type == "nvidia.com/gpu" and resources.accelerator.resource_count == "1"
    assert (resources.resource_cpu_request, resources.resource_cpu_limit) == ("4", "8")
    assert (resources.resource_memory_request, resources.resource_memory_limit) == ("16Gi", "32Gi")
    assert not parse_container(spec, "exec-evaluate-op").resources.HasField("accelerator")

    train = k8s["exec-train-op"]
    [shm] = train.empty_dir_mounts
    assert (shm.mount_path, shm.medium, shm.size_limit) == ("/dev/shm", "Memory", "8Gi")
    [toleration] = train.tolerations
    assert (toleration.key, toleration.operator, toleration.effect) == ("nvidia.com/gpu", "Exists", "NoSchedule")
    assert not train.node_selector.labels  # optional, off by default
    assert all(not k8s[name].empty_dir_mounts and not k8s[name].tolerations for name in k8s if name != "exec-train-op")

    retry = loop_tasks(spec)[1]["train-op"].retry_policy
    assert (retry.max_retry_count, retry.backoff_duration.seconds, retry.backoff_factor,
            retry.backoff_max_duration.seconds) == (2, 60, 2.0, 3600)
    assert spec.root.dag.tasks["ingest-op"].caching_options.enable_cache


def test_store_credentials_come_from_the_secret_only(compiled):
    spec, k8s, text = compiled
    assert set(k8s) == EXECUTORS  # every step reads or writes the store (report: the run's results)
    for name in EXECUTORS:
        [secret] = k8s[name].secret_as_env
        assert secret.secret_name == "mlpipeline-minio-artifact"
        assert {m.secret_key: m.env_var for m in secret.key_to_env} == {
            "accesskey": "MINIO_ACCESS_KEY", "secretkey": "MINIO_SECRET_KEY"}
        env = {e.name: e.value for e in parse_container(spec, name).env}
        # Kubeflow's bucket is not ours: the tasks never check for it or create it; train has its GPU
        assert env == {"MINIO_ENDPOINT": "minio-service.kubeflow:9000", "MINIO_CREATE_BUCKET": "false",
                       **({"PNEUMONIA_KFP_REQUIRE_GPU": "1"} if name == "exec-train-op" else {})}
    for value in CREDENTIALS.values():
        assert value not in text


def test_platform_spec_has_no_field_that_old_drivers_reject(compiled):
    """KFP 2.3.0-2.4.0 drivers parse the executor config strictly and know neither
    SecretAsEnv.optional nor *.secretNameParameter; 2.14's compiler rejects optional. Checked on the
    raw YAML, and against the descriptor of the kfp-kubernetes release 2.3.0 was built with in
    tests/test_kfp_compat.py."""
    _, _, text = compiled
    platform = list(yaml.safe_load_all(text))[1]
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    found = set()

    def walk(node):
        if isinstance(node, dict):
            found.update(k for k in node if k == "optional" or k.endswith("NameParameter"))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(executors)
    assert found == set()
    assert all(s["secretName"] == "mlpipeline-minio-artifact" for e in executors.values() for s in e["secretAsEnv"])


def test_stripping_keeps_what_carries_meaning():
    """optional: true and a secret name from a pipeline parameter say something: they stay."""
    from kfp import dsl, kubernetes

    from pneumonia_kfp.components.start import start_op
    from pneumonia_kfp.pipelines.pipeline import compatible_platform_spec

    @dsl.pipeline(name="p")
    def p(secret: str, storage: str):
        a = start_op(storage=storage)
        kubernetes.use_secret_as_env(a, secret_name="constant", secret_key_to_env={"k": "K"}, optional=True)
        b = start_op(storage=storage)
        kubernetes.use_secret_as_env(b, secret_name=secret, secret_key_to_env={"k": "K"})
        kubernetes.set_image_pull_secrets(b, ["regcred"])

    before = json_format.MessageToDict(p.platform_spec)["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    after = json_format.MessageToDict(compatible_platform_spec(p.platform_spec))["platforms"]["kubernetes"][
        "deploymentSpec"]["executors"]
    [a] = after["exec-start-op"]["secretAsEnv"]
    assert a["optional"] is True and "secretNameParameter" not in a and a["secretName"] == "constant"
    [b] = after["exec-start-op-2"]["secretAsEnv"]
    assert "optional" not in b and b["secretNameParameter"] == before["exec-start-op-2"]["secretAsEnv"][0][
        "secretNameParameter"]  # a runtime value: the only place the name is
    assert after["exec-start-op-2"]["imagePullSecret"] == [{"secretName": "regcred"}]


def test_settings_file_env_and_flags_layer_in_that_order(tmp_path, monkeypatch):
    settings = tmp_path / "settings.yaml"
    settings.write_text(yaml.safe_dump({
        "minio": {"endpoint": "https://minio.storage:9000", "secret": "team-minio",
                  "access_key_key": "AWS_ACCESS_KEY_ID", "secret_key_key": "AWS_SECRET_ACCESS_KEY"},
        "env": {"PNEUMONIA_KFP_PUSHGATEWAY": "pushgateway.monitoring:9091"},
        "storage": "s3://team-bucket/{namespace}/xray",
        "image_pull_secrets": ["regcred"],
        "ingest": {"cache": False},
        "train": {"accelerator_count": 0, "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                  "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoExecute",
                                   "tolerationSeconds": 600}],
                  "cpu_limit": 16, "shm_size": "16Gi", "retries": 5},
    }))
    monkeypatch.setenv("PNEUMONIA_KFP_TRAIN_ACCELERATOR_COUNT", "1")  # env beats the file
    monkeypatch.setenv("PNEUMONIA_KFP_IMAGE", "registry.example.com/from-env:2")
    spec, k8s, _ = compile_spec(tmp_path, "--settings", str(settings), "--set", "train.retries=0", "--image", IMAGE,
                                "--set", "env.HTTPS_PROXY=http://proxy:3128", "--set", "minio.create_bucket=true")

    assert parse_container(spec, "exec-train-op").image == IMAGE  # flags beat env
    train_resources = parse_container(spec, "exec-train-op").resources
    assert train_resources.accelerator.resource_count == "1" and train_resources.resource_cpu_limit == "16"
    assert not loop_tasks(spec)[1]["train-op"].HasField("retry_policy")
    assert not spec.root.dag.tasks["ingest-op"].caching_options.enable_cache

    train = k8s["exec-train-op"]
    assert dict(train.node_selector.labels) == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    [toleration] = train.tolerations
    assert (toleration.key, toleration.value, toleration.effect, toleration.toleration_seconds) == (
        "dedicated", "gpu", "NoExecute", 600)
    assert train.empty_dir_mounts[0].size_limit == "16Gi"
    for name in EXECUTORS:
        [secret] = k8s[name].secret_as_env
        assert secret.secret_name == "team-minio"
        assert {m.secret_key: m.env_var for m in secret.key_to_env} == {
            "AWS_ACCESS_KEY_ID": "MINIO_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY": "MINIO_SECRET_KEY"}
        assert {e.name: e.value for e in parse_container(spec, name).env} == {
            "MINIO_ENDPOINT": "https://minio.storage:9000", "PNEUMONIA_KFP_PUSHGATEWAY": "pushgateway.monitoring:9091",
            "HTTPS_PROXY": "http://proxy:3128",  # and no MINIO_CREATE_BUCKET: this store's bucket is ours
            **({"PNEUMONIA_KFP_REQUIRE_GPU": "1"} if name == "exec-train-op" else {})}
    assert all([p.secret_name for p in k8s[name].image_pull_secret] == ["regcred"] for name in k8s)


def test_cpu_only_training(tmp_path):
    spec, _, _ = compile_spec(tmp_path, "--set", "train.accelerator_count=0")
    train = parse_container(spec, "exec-train-op")
    assert not train.resources.HasField("accelerator")
    assert "PNEUMONIA_KFP_REQUIRE_GPU" not in {e.name for e in train.env}  # a CPU task may train on the CPU


@pytest.mark.parametrize("args, message", [
    (["--image", "registry.example.com/pneumonia-kfp:latest"], "never :latest"),
    (["--image", "registry.example.com/pneumonia-kfp:"], "pin the image with a tag or digest"),
    (["--set", "train.gpus=2"], "unknown setting 'train.gpus'; known: env, evaluate.cpu_limit"),
    (["--set", "train.memory_limit=32GB"], "train.memory_limit='32GB': expected a memory quantity"),
    (["--set", "train.accelerator_count=-1"], "train.accelerator_count=-1: expected 0 (CPU) or 1 (one GPU)"),
    (["--set", "train.tolerations=[{key: a, effects: NoSchedule}]"], "train.tolerations[0]="),
    (["--set", "train.tolerations=[{key: a, operator: Equals}]"], "operator Equal|Exists"),
    (["--set", "env={MINIO_ENDPOINT: x:9000}"], "set minio.endpoint instead"),
    (["--set", "env={MINIO_SECRET_KEY: x}"], "credentials come from the Secret minio.secret"),
    (["--set", "env.AWS_SECRET_ACCESS_KEY=x"], "credentials come from the Secret minio.secret"),
    (["--set", "env.MINIO_CREATE_BUCKET=true"], "set minio.create_bucket instead"),
    (["--set", "storage=/data/store"], "storage='/data/store': expected s3://bucket/prefix"),
    (["--set", "minio.secret=Not_A_Name"], "minio.secret='Not_A_Name': expected a Kubernetes name"),
    (["--set", "train.retries"], "expected KEY=VALUE"),
    (["--settings", "/does/not/exist.yaml"], "settings file /does/not/exist.yaml"),
])
def test_bad_settings_are_one_clear_line(tmp_path, capsys, args, message):
    assert main(["compile", "-o", str(tmp_path / "p.yaml"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "p.yaml").exists()


def test_bad_environment_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("PNEUMONIA_KFP_TRAIN_ACCELERATOR_COUNT", "two")
    with pytest.raises(SettingsError, match="PNEUMONIA_KFP_TRAIN_ACCELERATOR_COUNT='two': expected int"):
        load()


def test_defaults_are_valid_and_the_dataclass_is_the_single_source():
    assert load(environ={}) == Settings().validate()


def test_image_without_tag_gets_this_checkouts_tag_and_others_warn(tmp_path, caplog):
    from pneumonia_kfp import __version__
    from pneumonia_kfp.components.kfp_defaults import IMAGE_TAG, LOCK_HASH

    assert IMAGE_TAG == f"{__version__}-{LOCK_HASH}"
    spec, _, _ = compile_spec(tmp_path, "--image", "registry.example.com:5000/team/pneumonia-kfp")
    assert parse_container(spec, "exec-train-op").image == f"registry.example.com:5000/team/pneumonia-kfp:{IMAGE_TAG}"
    assert not [r for r in caplog.records if r.levelname == "WARNING"]

    compile_spec(tmp_path, "--image", IMAGE)  # 1.2.3: some other build
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"image {IMAGE} is not tagged {IMAGE_TAG}" in warning and "make image" in warning
