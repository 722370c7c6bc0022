"""The Triton model repository export writes beside model.onnx: triton/<name>/config.pbtxt parsed strictly
against Triton's ModelConfig schema, its tensors equal to the ONNX graph's, and onnxruntime on
triton/<name>/1/model.onnx, fed as the config says, giving the model directory's probabilities."""
import errno
import os

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from pneumonia_kfp import export
from pneumonia_kfp.backbones import create_backbone, load_checkpoint, save_checkpoint
from pneumonia_kfp.export import CHECKPOINT, ONNX, export_model, triton_config, triton_name
from pneumonia_kfp.inference import PREDICT_PIXELS, predict

SIZE = 32
# Triton's DataType enum, in its numbering (triton-inference-server/common protobuf/model_config.proto)
DATA_TYPES = ["TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64", "TYPE_INT8",
              "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32", "TYPE_FP64", "TYPE_STRING",
              "TYPE_BF16"]
NUMPY = {"TYPE_UINT8": np.uint8, "TYPE_FP32": np.float32}
ONNX_TO_TRITON = {onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.FLOAT: "TYPE_FP32"}


def model_config_class():
    """The part of Triton's ModelConfig message this export writes, with its field names, numbers and types:
    text_format.Parse against it refuses an unknown field, a wrong type or an unknown DataType name."""
    F = descriptor_pb2.FieldDescriptorProto
    f = descriptor_pb2.FileDescriptorProto(name="triton_model_config_subset.proto", package="inference",
                                           syntax="proto3")
    dtype = f.enum_type.add(name="DataType")
    for number, name in enumerate(DATA_TYPES):
        dtype.value.add(name=name, number=number)

    def message(name, *fields):
        m = f.message_type.add(name=name)
        for field, number, kind, repeated, type_name in fields:
            m.field.add(name=field, number=number, type=kind, type_name=type_name,
                        label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)

    message("ModelTensorReshape", ("shape", 1, F.TYPE_INT64, True, None))
    message("ModelInput", ("name", 1, F.TYPE_STRING, False, None),
            ("data_type", 2, F.TYPE_ENUM, False, ".inference.DataType"), ("dims", 4, F.TYPE_INT64, True, None),
            ("reshape", 5, F.TYPE_MESSAGE, False, ".inference.ModelTensorReshape"))
    message("ModelOutput", ("name", 1, F.TYPE_STRING, False, None),
            ("data_type", 2, F.TYPE_ENUM, False, ".inference.DataType"), ("dims", 3, F.TYPE_INT64, True, None),
            ("reshape", 5, F.TYPE_MESSAGE, False, ".inference.ModelTensorReshape"),
            ("label_filename", 4, F.TYPE_STRING, False, None))
    message("ModelDynamicBatching", ("preferred_batch_size", 1, F.TYPE_INT32, True, None),
            ("max_queue_delay_microseconds", 2, F.TYPE_UINT64, False, None))
    message("ModelConfig", ("name", 1, F.TYPE_STRING, False, None), ("platform", 2, F.TYPE_STRING, False, None),
            ("max_batch_size", 4, F.TYPE_INT32, False, None),
            ("input", 5, F.TYPE_MESSAGE, True, ".inference.ModelInput"),
            ("output", 6, F.TYPE_MESSAGE, True, ".inference.ModelOutput"),
            ("dynamic_batching", 11, F.TYPE_MESSAGE, False, ".inference.ModelDynamicBatching"),
            ("backend", 17, F.TYPE_STRING, False, None))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


ModelConfig = model_config_class()


def parse(text: str):
    return text_format.Parse(text, ModelConfig())


def graph_tensors(path):
    """{name: (Triton type, shape with None for a symbolic axis)} of an ONNX file's inputs and outputs."""
    graph = onnx.load(str(path)).graph
    return {v.name: (ONNX_TO_TRITON[v.type.tensor_type.elem_type],
                     [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim])
            for v in [*graph.input, *graph.output]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "resnet18"
    folder.mkdir()
    torch.manual_seed(0)
    save_checkpoint(folder / CHECKPOINT, create_backbone("resnet18"), backbone="resnet18",
                    classes=["NORMAL", "PNEUMONIA"], image_size=SIZE, mean=0.45, std=0.226, threshold=0.4,
                    threshold_rule="youden", thresholds={"youden": 0.4, "balanced": 0.5}, tta=False, best_epoch=1)
    info = export_model(folder)
    return folder, info


def test_config_is_a_triton_model_config_whose_tensors_are_the_onnx_graphs(model_dir):
    folder, info = model_dir
    assert info["triton"] == {"repository": "triton", "model": "pneumonia-resnet18"}
    (model,) = (folder / "triton").iterdir()
    assert model.name == "pneumonia-resnet18"
    assert sorted(p.relative_to(model).as_posix() for p in model.rglob("*")) == ["1", "1/model.onnx", "config.pbtxt"]
    config = parse((model / "config.pbtxt").read_text())
    assert config.name == model.name and config.platform == "onnxruntime_onnx" and not config.backend
    # the batch axis is Triton's: a batch of up to PREDICT_PIXELS pixels, as the project's own inference
    assert config.max_batch_size == PREDICT_PIXELS // (SIZE * SIZE) == 12544
    assert config.HasField("dynamic_batching")
    tensors = graph_tensors(model / "1" / ONNX)
    assert tensors == {"images": ("TYPE_UINT8", [None, 1, SIZE, SIZE]), "probability": ("TYPE_FP32", [None])}
    (inp,), (out,) = config.input, config.output
    assert (inp.name, DATA_TYPES[inp.data_type], [None, *inp.dims]) == ("images", *tensors["images"])
    assert not inp.HasField("reshape")
    # P(positive) per image is the batch axis alone: Triton's [1] reshaped to the model's []
    assert (out.name, DATA_TYPES[out.data_type], list(out.dims)) == ("probability", "TYPE_FP32", [1])
    assert out.HasField("reshape") and list(out.reshape.shape) == []


def test_the_triton_model_is_the_directorys_model_onnx_hard_linked(model_dir):
    folder, _ = model_dir
    served = folder / "triton" / "pneumonia-resnet18" / "1" / ONNX
    assert os.path.samefile(folder / ONNX, served) and served.stat().st_nlink == 2
    assert not [p for p in folder.rglob("*") if ".partial-" in p.name]


def test_onnxruntime_fed_as_the_config_says_gives_the_models_probabilities(model_dir):
    folder, info = model_dir
    model = folder / "triton" / "pneumonia-resnet18"
    config = parse((model / "config.pbtxt").read_text())
    served = onnxruntime.InferenceSession(str(model / "1" / ONNX), providers=["CPUExecutionProvider"])
    own = onnxruntime.InferenceSession(str(folder / ONNX), providers=["CPUExecutionProvider"])
    net, ckpt = load_checkpoint(folder / CHECKPOINT)
    rng = np.random.default_rng(0)
    (inp,), (out,) = config.input, config.output
    for n in (1, 5):
        x = rng.integers(0, 256, (n, *inp.dims), dtype=np.uint8).astype(NUMPY[DATA_TYPES[inp.data_type]])
        (got,) = served.run([out.name], {inp.name: x})
        assert got.dtype == NUMPY[DATA_TYPES[out.data_type]]
        assert got.shape == (n, *out.reshape.shape)
        response = got.reshape(n, *out.dims)  # what Triton answers: N×1
        np.testing.assert_array_equal(response[:, 0], own.run(None, {"images": x})[0])
        np.testing.assert_allclose(response[:, 0], predict(net, x, ckpt["mean"], ckpt["std"]), atol=1e-4)
    assert 0 < info["threshold"] < 1


def test_a_copy_where_hard_links_are_refused_and_a_second_export_replaces_the_first(model_dir, monkeypatch):
    folder, info = model_dir

    def refuse(src, dst):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(export.os, "link", refuse)
    assert export_model(folder) == info
    served = folder / "triton" / "pneumonia-resnet18" / "1" / ONNX
    assert not os.path.samefile(folder / ONNX, served) and served.read_bytes() == (folder / ONNX).read_bytes()
    monkeypatch.undo()
    export_model(folder)
    assert os.path.samefile(folder / ONNX, served)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.pt", "metadata.json", "model.onnx", "model.pt2",
                                                        "triton"]


def test_a_model_without_a_batch_axis_is_served_unbatched(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    config = parse(triton_config(helper.make_model(graph), "fixed"))
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert [(t.name, list(t.dims)) for t in [*config.input, *config.output]] == [("x", [2, 3]), ("y", [2, 3])]
    graph.input[0].type.tensor_type.elem_type = TensorProto.COMPLEX64
    with pytest.raises(ValueError, match="ONNX input 'x' has element type COMPLEX64, which Triton does not take"):
        triton_config(helper.make_model(graph), "fixed")


def test_triton_names_are_url_safe():
    assert triton_name("resnet18") == "pneumonia-resnet18"
    assert triton_name("vit_base_patch16_224.augreg_in21k") == "pneumonia-vit_base_patch16_224-augreg_in21k"
    assert triton_name("ResNet/50") == "pneumonia-resnet-50"
