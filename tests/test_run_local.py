"""run-local without --data (the synthetic path) and with --pretrained from weights saved here,
through the real kfp local runner."""
import json

import torch

from pneumonia_kfp.backbones import load_checkpoint
from pneumonia_kfp.pipelines.cli import main
from pneumonia_kfp.pipelines.local import SYNTHETIC_WARNING


def test_synthetic_run_with_pretrained_weights_from_a_file(tmp_path, capfd):
    import timm

    torch.manual_seed(123)
    imagenet = timm.create_model("resnet18", pretrained=False)  # ImageNet-shaped: 3 channels, 1000 classes
    weights = tmp_path / "resnet18-imagenet.pth"
    torch.save(imagenet.state_dict(), weights)
    out = tmp_path / "out"
    # a learning rate of 1e-9 leaves the weights where they started: the checkpoint shows where that was
    rc = main(["run-local", "--output", str(out), "--backbones", "resnet18", "--epochs", "1", "--image-size", "32",
               "--batch-size", "32", "--learning-rate", "1e-9", "--pretrained", "--pretrained-weights", str(weights)])
    assert rc == 0
    printed = capfd.readouterr().out
    assert "!!! No --data given: using a SYNTHETIC dataset" in printed and SYNTHETIC_WARNING in printed
    assert (out / "synthetic-data" / "train" / "PNEUMONIA").is_dir()

    results = json.loads((out / "results.json").read_text())
    assert results["dataset"]["synthetic"] is True
    assert results["dataset"]["counts"]["test"] == {"NORMAL": 16, "PNEUMONIA": 16}
    [model] = results["models"]
    assert model["pretrained"] is True and model["backbone"] == "resnet18"
    assert "SYNTHETIC DATA" in (out / "report.md").read_text() and "SYNTHETIC DATA" in (out / "report.html").read_text()

    [checkpoint] = [p for p in (out / "kfp-root").rglob("model") if p.is_file() and "train-op" in str(p)]
    trained, meta = load_checkpoint(checkpoint)
    assert meta["pretrained"] is True
    state, source = trained.state_dict(), imagenet.state_dict()
    # timm folds the RGB first convolution into one grayscale channel by summing it
    torch.testing.assert_close(state["conv1.weight"], source["conv1.weight"].sum(dim=1, keepdim=True),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(state["layer4.1.conv2.weight"], source["layer4.1.conv2.weight"], atol=1e-5, rtol=0)
    assert state["fc.weight"].shape == (2, 512)  # a new 2-class head, not ImageNet's 1000 classes
