"""--pretrained-weights for air-gapped clusters: one file (one backbone), a directory of
<backbone>.safetensors|.pth|.pt (local, file:// or s3://), or a mapping backbone=FILE,... Every weights
file here is saved by the test itself (nothing can be downloaded)."""
import pytest
import torch
from safetensors.torch import save_file

from pneumonia_kfp.backbones import PretrainedWeights, WeightsError, create_backbone
from pneumonia_kfp.errors import UsageError
from pneumonia_kfp.params import check_run_params
from pneumonia_kfp.pipelines.cli import main

TWO = ["resnet18", "efficientnet_b0"]
HEADS = {"resnet18": "fc.", "efficientnet_b0": "classifier."}  # timm drops a pretrained head of another size


def perturbed_state(name: str, seed: int) -> dict:
    """A state dict of ``name`` (1 channel, 2 classes) whose float tensors no fresh model has."""
    torch.manual_seed(seed)
    state = create_backbone(name).state_dict()
    g = torch.Generator().manual_seed(seed)
    return {k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v).contiguous()
            for k, v in state.items()}


def assert_loaded(model, state: dict, name: str) -> None:
    loaded = model.state_dict()
    body = [k for k in state if not k.startswith(HEADS[name])]
    assert len(body) > 50  # not vacuous: the whole body is compared
    for k in body:
        assert torch.equal(loaded[k], state[k]), k


@pytest.fixture(scope="module")
def states():
    return {name: perturbed_state(name, seed) for seed, name in enumerate(TWO, start=1)}


def test_a_directory_holds_each_backbones_weights(tmp_path, states):
    save_file(states["resnet18"], tmp_path / "resnet18.safetensors")
    save_file(states["efficientnet_b0"], tmp_path / "efficientnet_b0.safetensors")
    # a second resnet18 file: .safetensors comes first in the lookup, so this one is not read
    torch.save(perturbed_state("resnet18", 9), tmp_path / "resnet18.pth")
    assert check_run_params({"backbones": TWO, "pretrained_weights": str(tmp_path)})["backbones"] == TWO
    for source in (str(tmp_path), tmp_path.as_uri() + "/"):
        for name in TWO:
            assert_loaded(create_backbone(name, pretrained=True, weights=source), states[name], name)
    # a .pth state dict is found where no .safetensors is
    (tmp_path / "resnet18.safetensors").unlink()
    assert PretrainedWeights(str(tmp_path)).file_for("resnet18") == str(tmp_path / "resnet18.pth")


def test_a_mapping_names_each_backbones_file(tmp_path, states):
    save_file(states["resnet18"], tmp_path / "a.safetensors")
    torch.save(states["efficientnet_b0"], tmp_path / "b.pth")
    mapping = f"resnet18={tmp_path / 'a.safetensors'}, efficientnet_b0={(tmp_path / 'b.pth').as_uri()}"
    assert check_run_params({"backbones": TWO, "pretrained_weights": mapping})["backbones"] == TWO
    for name in TWO:
        assert_loaded(create_backbone(name, pretrained=True, weights=mapping), states[name], name)


def test_a_backbone_without_weights_is_one_line_naming_it_and_where_it_looked(tmp_path, states):
    save_file(states["resnet18"], tmp_path / "resnet18.safetensors")
    # a mapping: told from its text, before any work
    with pytest.raises(WeightsError) as e:
        check_run_params({"backbones": TWO, "pretrained_weights": f"resnet18={tmp_path / 'resnet18.safetensors'}"})
    assert str(e.value) == ("pretrained_weights maps no weights to efficientnet_b0 (it maps resnet18): "
                            "add efficientnet_b0=FILE")
    # a directory: looked into when the model is built, before training
    with pytest.raises(WeightsError) as e:
        create_backbone("efficientnet_b0", pretrained=True, weights=str(tmp_path))
    assert str(e.value) == ("pretrained_weights has no weights for efficientnet_b0: looked for "
                            "efficientnet_b0.safetensors, efficientnet_b0.pth, efficientnet_b0.pt in " + str(tmp_path))
    with pytest.raises(WeightsError, match=r"^pretrained_weights directory \S+/nope does not exist \(looked there "
                                           r"for resnet18's weights: resnet18.safetensors, "):
        create_backbone("resnet18", pretrained=True, weights=str(tmp_path / "nope"))


def test_one_file_for_several_backbones_is_one_line(tmp_path, states):
    save_file(states["resnet18"], tmp_path / "r18.safetensors")
    one = str(tmp_path / "r18.safetensors")
    assert check_run_params({"backbones": ["resnet18"], "pretrained_weights": one})  # one backbone: as before
    assert_loaded(create_backbone("resnet18", pretrained=True, weights=one), states["resnet18"], "resnet18")
    with pytest.raises(WeightsError) as e:
        check_run_params({"backbones": TWO, "pretrained_weights": one})
    message = str(e.value)
    assert message.startswith(f"pretrained_weights {one} is one weights file, but the run trains 2 backbones "
                              "(resnet18, efficientnet_b0): give a directory holding <backbone>.safetensors")
    assert "or a mapping such as resnet18=" in message and "\n" not in message


@pytest.mark.parametrize("value, message", [
    ("resnet18=", "pretrained_weights entry 'resnet18=' is not backbone=FILE: write e.g. resnet18="),
    ("resnet18=/w/a.pth,/w/b.pth", "pretrained_weights entry '/w/b.pth' is not backbone=FILE"),
    ("resnet18=/w/a.pth,resnet18=/w/b.pth", "pretrained_weights maps resnet18 more than once"),
    ("resnet81=/w/a.pth", "pretrained_weights maps unknown backbone 'resnet81': not a timm model name. Did you mean"),
    ("http://host/w.pth", "pretrained_weights URI 'http://host/w.pth': scheme http:// is not supported"),
    ("resnet18=s3:///w.pth", "pretrained_weights URI 's3:///w.pth' names no bucket"),
])
def test_malformed_values_are_one_line(value, message):
    with pytest.raises(WeightsError) as e:
        check_run_params({"backbones": ["resnet18"], "pretrained_weights": value})
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_the_form_is_read_from_the_text():
    assert PretrainedWeights("").kind == "hub"
    assert PretrainedWeights("s3://bkt/w/r18.safetensors").kind == "file"
    assert PretrainedWeights("/w/r18.pt").kind == PretrainedWeights("/w/r18.bin").kind == "file"
    assert PretrainedWeights("s3://bkt/w").kind == PretrainedWeights("/w/r18.pth/").kind == "directory"
    # '=' inside a path or URI is no mapping
    assert PretrainedWeights("/w/run=3/r18.pth").kind == PretrainedWeights("s3://bkt/k=v/r18.pth").kind == "file"
    assert PretrainedWeights("resnet18=s3://bkt/k=v/r18.pth").mapping == {"resnet18": "s3://bkt/k=v/r18.pth"}


def test_a_file_without_a_weights_suffix_is_asked_to_be_renamed(tmp_path, states):
    torch.save(states["resnet18"], tmp_path / "weights")
    with pytest.raises(WeightsError, match=r"weights is a file whose name does not end in \.safetensors, .*: "
                                           r"rename it, e.g\. to weights\.pth"):
        create_backbone("resnet18", pretrained=True, weights=str(tmp_path / "weights"))


def test_an_s3_directory(s3_env, tmp_path, states):
    from pneumonia_kfp.storage import open_store

    store = open_store("s3://weights-bucket/imagenet")
    for name in TWO:
        save_file(states[name], tmp_path / f"{name}.safetensors")
        store.put_file(f"{name}.safetensors", tmp_path / f"{name}.safetensors")
    for name in TWO:
        assert_loaded(create_backbone(name, pretrained=True, weights="s3://weights-bucket/imagenet/"),
                      states[name], name)
    with pytest.raises(WeightsError) as e:
        create_backbone("resnet50", pretrained=True, weights="s3://weights-bucket/imagenet")
    assert str(e.value) == ("pretrained_weights has no weights for resnet50: looked for resnet50.safetensors, "
                            "resnet50.pth, resnet50.pt in s3://weights-bucket/imagenet")


@pytest.mark.parametrize("weights, message", [
    ("/w/r18.safetensors", "pretrained_weights /w/r18.safetensors is one weights file, but the run trains 2"),
    ("resnet18=/w/r18.safetensors", "pretrained_weights maps no weights to efficientnet_b0"),
])
def test_run_local_refuses_before_any_work(tmp_path, capsys, weights, message):
    rc = main(["run-local", "--output", str(tmp_path / "o"), "--backbones", ",".join(TWO), "--pretrained",
               "--pretrained-weights", weights])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_weights_without_pretrained_are_refused_not_ignored(tmp_path):
    """Weights given with pretrained off would train from scratch without a word: one line instead."""
    with pytest.raises(UsageError) as e:
        check_run_params({"backbones": ["resnet18"], "pretrained": False, "pretrained_weights": str(tmp_path)})
    assert str(e.value) == ("pretrained_weights is given but pretrained is off, so the weights would be ignored: add "
                            "--pretrained (pipeline: pretrained=true), or leave out --pretrained-weights")
    assert check_run_params({"backbones": ["resnet18"], "pretrained": True, "pretrained_weights": str(tmp_path)})
    assert check_run_params({"backbones": ["resnet18"], "pretrained": False, "pretrained_weights": ""})
