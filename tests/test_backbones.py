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


def test_weights_that_leave_backbone_tensors_unloaded_are_an_error_naming_them(tmp_path):
    import torchvision

    # torchvision's ResNet names its layers as timm's does: it loads (timm sums the first conv)
    tv_resnet = torchvision.models.resnet18(weights=None)
    torch.save(tv_resnet.state_dict(), tmp_path / "tv_resnet18.pth")
    model = create_backbone("resnet18", pretrained=True, weights=str(tmp_path / "tv_resnet18.pth"))
    assert torch.equal(model.layer4[1].conv2.weight, tv_resnet.layer4[1].conv2.weight)
    # torchvision's EfficientNet does not: timm would load nothing and train from random weights
    torch.save(torchvision.models.efficientnet_b0(weights=None).state_dict(), tmp_path / "tv_effnet.pth")
    with pytest.raises(BackboneError) as e:
        create_backbone("efficientnet_b0", pretrained=True, weights=str(tmp_path / "tv_effnet.pth"))
    message = str(e.value)
    assert "tv_effnet.pth left" in message and "tensors unloaded (blocks.0.0.conv_dw.weight" in message
    # one tensor missing from otherwise complete timm weights is named too
    import timm

    state = timm.create_model("resnet18", num_classes=1000, in_chans=3).state_dict()
    del state["layer3.0.conv1.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(BackboneError, match=r"left 1 resnet18 tensors unloaded \(layer3.0.conv1.weight\)"):
        create_backbone("resnet18", pretrained=True, weights=str(tmp_path / "partial.pth"))


def test_a_pretrained_model_starts_from_the_same_random_state_as_before(tmp_path):
    import timm

    torch.save(timm.create_model("resnet18", num_classes=1000, in_chans=3).state_dict(), tmp_path / "r18.pth")
    torch.manual_seed(7)
    a = create_backbone("resnet18", pretrained=True, weights=str(tmp_path / "r18.pth"))
    after_a = torch.rand(3)
    torch.manual_seed(7)
    b = timm.create_model("resnet18", pretrained=True, num_classes=2, in_chans=1,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "r18.pth")))
    assert torch.equal(a.fc.weight, b.fc.weight)  # the new head: the seed's, as without the check
    assert torch.equal(after_a, torch.rand(3))  # and the caller's random stream carries on unchanged
