import pytest
import torch

from pneumonia_kfp.backbones import BackboneError, check_backbone, create_backbone, load_checkpoint, save_checkpoint
from pneumonia_kfp.params import SEED_BACKBONES


@pytest.mark.parametrize("name", SEED_BACKBONES + ("convnext_atto",))
def test_two_class_head_and_grayscale_input(name):
    model = create_backbone(name).eval()
    with torch.inference_mode():
        out = model(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 2)
    assert model.get_classifier().out_features == 2


def test_unknown_backbone_suggests_timm_names():
    with pytest.raises(BackboneError, match="Did you mean.*resnet50"):
        check_backbone("resnet05")


def test_pretrained_weights_from_a_local_file_and_a_store_uri(tmp_path):
    import timm

    from pneumonia_kfp.storage import open_store

    # an ImageNet-shaped checkpoint (3 channels, 1000 classes), saved here since nothing can be downloaded
    imagenet = timm.create_model("resnet18", num_classes=1000, in_chans=3)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(imagenet.state_dict(), path)
    open_store(tmp_path.as_uri()).put_file("weights/r18.pth", path)
    for source in (str(path), (tmp_path / "weights" / "r18.pth").as_uri()):
        model = create_backbone("resnet18", pretrained=True, weights=source)
        # timm folds the RGB filters into one grayscale channel and keeps the rest of the body
        assert torch.allclose(model.conv1.weight, imagenet.conv1.weight.sum(1, keepdim=True), atol=1e-6)
        assert torch.equal(model.layer4[1].conv2.weight, imagenet.layer4[1].conv2.weight)
        assert model.fc.out_features == 2
    with pytest.raises(BackboneError, match="does not exist"):
        create_backbone("resnet18", pretrained=True, weights=str(tmp_path / "nope.pth"))


def test_checkpoint_roundtrip(tmp_path):
    model = create_backbone("resnet18").eval()
    save_checkpoint(tmp_path / "m.pt", model, backbone="resnet18", classes=["A", "B"], threshold=0.3)
    loaded, meta = load_checkpoint(tmp_path / "m.pt")
    x = torch.randn(3, 1, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(loaded.eval()(x), model(x))
    assert meta["threshold"] == 0.3 and meta["classes"] == ["A", "B"]
