"""Where platform settings come from, and which source wins: defaults < file (--settings or
$PNEUMONIA_KFP_SETTINGS, YAML or JSON) < PNEUMONIA_KFP_* environment < --set / --image."""
import argparse
import json

import pytest

from pneumonia_kfp.pipelines.settings import (
    Settings,
    SettingsError,
    add_arguments,
    env_name,
    from_args,
    keys,
    load,
    pinned_image,
)

IMAGE = "registry.example.com/pneumonia-kfp:1.2.3"


def test_defaults_without_any_source():
    s = load(environ={})
    assert s == Settings()
    assert (s.train.accelerator_count, s.train.retries, s.minio.secret) == (1, 2, "mlpipeline-minio-artifact")


def test_json_file_from_the_environment_variable(tmp_path):
    f = tmp_path / "settings.json"
    f.write_text(json.dumps({"image": IMAGE, "train": {"accelerator_count": 0, "retry_backoff_factor": 3,
                                                         "node_selector": {"pool": "gpu"}},
                             "minio": {"secret": "team-minio"}, "ingest.cache": False}))
    s = load(environ={"PNEUMONIA_KFP_SETTINGS": str(f)})
    assert s.image == IMAGE and s.train.accelerator_count == 0 and s.minio.secret == "team-minio"
    assert s.train.retry_backoff_factor == 3.0 and isinstance(s.train.retry_backoff_factor, float)
    assert s.train.node_selector == {"pool": "gpu"} and s.ingest.cache is False  # dotted keys work in files too
    assert s.train.retries == 2  # untouched keys keep their defaults


def test_every_layer_overrides_the_one_before(tmp_path):
    env_file = tmp_path / "from-env.yaml"
    env_file.write_text("train:\n  retries: 7\n  accelerator_count: 0\nminio:\n  secret: env-file-secret\n")
    flag_file = tmp_path / "from-flag.yaml"
    flag_file.write_text("train:\n  retries: 4\n  accelerator_count: 1\n  cpu_limit: 6\n")
    environ = {"PNEUMONIA_KFP_SETTINGS": str(env_file), "PNEUMONIA_KFP_TRAIN_ACCELERATOR_COUNT": "0",
               "PNEUMONIA_KFP_TRAIN_SHM_SIZE": "4Gi"}
    s = load(str(flag_file), ["train.shm_size=2Gi"], environ=environ)
    assert s.train.retries == 4  # the --settings file replaces $PNEUMONIA_KFP_SETTINGS's file entirely
    assert s.minio.secret == "mlpipeline-minio-artifact"
    assert s.train.cpu_limit == "6"  # a YAML number for a quantity is the quantity's text
    assert s.train.accelerator_count == 0  # environment beats the file
    assert s.train.shm_size == "2Gi"  # --set beats the environment
    assert load(str(flag_file), ["train.accelerator_count=1"], environ=environ).train.accelerator_count == 1


def test_the_cli_flags(tmp_path, monkeypatch):
    f = tmp_path / "s.yaml"
    f.write_text(f"image: {IMAGE}-from-file\n")
    monkeypatch.setenv("PNEUMONIA_KFP_IMAGE", "registry.example.com/from-env:1")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--settings", str(f), "--set", "train.retries=1", "--image", IMAGE])
    s = from_args(args)
    assert s.image == IMAGE and s.train.retries == 1
    assert from_args(parser.parse_args(["--settings", str(f)])).image == "registry.example.com/from-env:1"
    monkeypatch.delenv("PNEUMONIA_KFP_IMAGE")
    assert from_args(parser.parse_args(["--settings", str(f)])).image == f"{IMAGE}-from-file"
    # --image after --set: the flag meant for it wins over a --set of the same key
    assert from_args(parser.parse_args(["--set", "image=a.io/b:1", "--image", IMAGE])).image == IMAGE


def test_text_values_are_parsed_as_yaml():
    s = load(overrides=["train.tolerations=[{key: a, operator: Exists}]", "env={PUSHGATEWAY: 'pg:9091'}",
                        "train.node_selector={gpu: a100}", "ingest.cache=false", "train.retry_backoff_factor=1.5",
                        "train.memory_limit=64Gi", "image_pull_secrets=[regcred]", " train.retries =3",
                        "env={JAVA_OPTS: '-Dx=1'}"],
             environ={})
    assert s.train.tolerations == [{"key": "a", "operator": "Exists"}]
    assert s.env == {"JAVA_OPTS": "-Dx=1"} and s.train.node_selector == {"gpu": "a100"}
    assert s.ingest.cache is False and s.train.retry_backoff_factor == 1.5 and s.train.memory_limit == "64Gi"
    assert s.image_pull_secrets == ["regcred"] and s.train.retries == 3


def test_environment_names():
    assert env_name("train.accelerator_count") == "PNEUMONIA_KFP_TRAIN_ACCELERATOR_COUNT"
    assert env_name("image") == "PNEUMONIA_KFP_IMAGE"
    all_keys = keys()
    assert all_keys["train.accelerator_count"] is int and all_keys["ingest.cache"] is bool
    assert all_keys["minio.secret"] is str and all_keys["train.retry_backoff_factor"] is float
    assert "train" not in all_keys and "train.cpu_limit" in all_keys and "report.memory_limit" in all_keys
    # top level, minio, ingest, train, evaluate, report, start, launcher
    assert len(all_keys) == 5 + 5 + 5 + 14 + 4 + 4 + 4 + 4


@pytest.mark.parametrize("kwargs, message", [
    ({"overrides": ["train.accelerator_count=two"]}, "train.accelerator_count='two': expected int"),
    ({"overrides": ["train.accelerator_count=true"]}, "train.accelerator_count=True: expected int"),
    ({"overrides": ["ingest.cache=3"]}, "ingest.cache=3: expected bool"),
    ({"overrides": ["train.retry_backoff_factor=fast"]}, "train.retry_backoff_factor='fast': expected float"),
    ({"overrides": ["train.node_selector=[a]"]}, "train.node_selector=['a']: expected dict"),
    ({"overrides": ["train.tolerations={a: b"]}, "train.tolerations='{a: b': not valid YAML"),
    ({"overrides": ["train.gpus=2"]}, "unknown setting 'train.gpus'; known: env, evaluate.cpu_limit,"),
    ({"overrides": ["train.retries"]}, "--set 'train.retries': expected KEY=VALUE"),
    ({"overrides": ["env.=x"]}, "unknown setting 'env.'"),  # a variable needs a name
    ({"environ": {"PNEUMONIA_KFP_TRAIN_RETRIES": "many"}}, "PNEUMONIA_KFP_TRAIN_RETRIES='many': expected int"),
    ({"overrides": ["image=registry.example.com/x:latest"]}, "pin the image with a tag or digest"),
])
def test_bad_values_name_their_key(kwargs, message):
    with pytest.raises(SettingsError) as e:
        load(**{"environ": {}, **kwargs})
    assert message in str(e.value)


@pytest.mark.parametrize("content, message", [
    ("- a\n- b\n", "expected a mapping of settings at the top level"),
    ("train: [1\n", "settings file"),
    ("train:\n  retries: two\n", "train.retries='two': expected int"),
    ("minio:\n  secret: Team_Minio\n", "minio.secret='Team_Minio': expected a Kubernetes name"),
    ("env.FOO: [1, 2]\n", "env.FOO=[1, 2]: expected str"),  # a dotted key: one variable
])
def test_bad_files(tmp_path, content, message):
    f = tmp_path / "s.yaml"
    f.write_text(content)
    with pytest.raises(SettingsError, match=message.replace("[", "\\[")):
        load(str(f), environ={})


def test_missing_file_from_the_environment_names_it(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SettingsError, match=f"settings file {missing}"):
        load(environ={"PNEUMONIA_KFP_SETTINGS": str(missing)})


def test_empty_file_is_the_defaults(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("")
    assert load(str(f), environ={}) == Settings()


@pytest.mark.parametrize("image", ["registry.example.com/x:1.0", "x@sha256:" + "a" * 64, "localhost:5000/x:2",
                                   "r.io/team/x:latest-but-pinned"])
def test_pinned_images_pass_unchanged(image):
    assert pinned_image(image) == image


@pytest.mark.parametrize("image", ["localhost:5000/x", "r.io/team/x"])
def test_untagged_images_get_this_checkouts_tag(image):
    from pneumonia_kfp.components.kfp_defaults import IMAGE_TAG

    assert pinned_image(image) == f"{image}:{IMAGE_TAG}"


@pytest.mark.parametrize("image", ["", "r.io/x:latest", "r.io/x:"])
def test_latest_or_empty_images_fail(image):
    with pytest.raises(SettingsError, match="pin the image"):
        pinned_image(image)


def test_a_one_letter_environment_variable():
    assert load(overrides=["env.A=1", "env.LOG_LEVEL=debug"], environ={}).env == {"A": "1", "LOG_LEVEL": "debug"}
