"""export: a trained model as one directory -- the checkpoint and two serving forms.

    <model dir>/checkpoint.pt    the selected epoch's weights and metadata (train writes it)
    <model dir>/model.pt2        torch.export program: ``torch.export.load(path).module()``
    <model dir>/model.onnx       ONNX (opset from torch's dynamo exporter), for onnxruntime & co.
    <model dir>/metadata.json    classes, validation-chosen threshold(s), image size, backbone
    <model dir>/triton/<name>/config.pbtxt, 1/model.onnx
                                 a Triton model repository (KServe's kserve-tritonserver runtime, modelFormat
                                 onnx, protocolVersion v2): model.onnx again (a hard link where the filesystem
                                 allows), and its config, whose names, data types and shapes are read from it

Both serving forms take what ingest stores -- uint8 images, N×1×S×S, S = the training image size,
any N -- and return the probability of the positive class (normalisation and softmax inside), so
a consumer needs no timm and no project code. The metadata also travels inside each file
(``extra_files`` of the .pt2, ``metadata_props`` of the ONNX model). TorchScript is gone: torch
deprecates it in favour of ``torch.export``, and nothing here needed it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import warnings
from pathlib import Path

from pneumonia_kfp.documents import ModelInfo, model_info, read_model_info
from pneumonia_kfp.outputs import document, replacing, write_file

CHECKPOINT, PT2, ONNX, METADATA = "checkpoint.pt", "model.pt2", "model.onnx", "metadata.json"
FORMATS = {"torch.export": PT2, "onnx": ONNX}
TRITON, TRITON_CONFIG, TRITON_VERSION = "triton", "config.pbtxt", "1"
MAX_BATCH = 65536  # the exported programs' batch axis: 1 .. MAX_BATCH images
log = logging.getLogger(__name__)


def checkpoint_in(path: str | Path) -> str:
    """The checkpoint file of a model directory (or ``path`` itself when it is the file)."""
    p = Path(path)
    return str(p / CHECKPOINT) if p.is_dir() else str(p)


def _deployable(model, mean: float, std: float):
    import torch

    class Deployable(torch.nn.Module):
        """uint8 N×1×S×S -> P(positive class), N."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, images):
            x = images.float() * (1 / (255 * std)) - mean / std
            return torch.softmax(self.model(x).float(), 1)[:, 1]

    return Deployable().eval()


# what export reads from the checkpoint's metadata (documents.CheckpointMeta), besides backbone and classes
EXPORT_FIELDS = ("image_size", "mean", "std", "threshold", "threshold_rule", "thresholds", "best_epoch", "tta")


def export_model(directory: str | Path) -> ModelInfo:
    """Write model.pt2, model.onnx and metadata.json beside ``directory``'s checkpoint; returns the metadata."""
    import torch

    from pneumonia_kfp.backbones import load_checkpoint

    directory = Path(directory)
    model, meta = load_checkpoint(directory / CHECKPOINT, "cpu", required=EXPORT_FIELDS)
    size = int(meta["image_size"])
    info = model_info(
        formats=FORMATS, backbone=meta["backbone"], classes=list(meta["classes"]),
        positive_class=meta["classes"][1], threshold=float(meta["threshold"]),
        threshold_rule=meta["threshold_rule"], thresholds=meta["thresholds"], image_size=size,
        input=f"uint8 N×1×{size}×{size}", output=f"P({meta['classes'][1]}), N",
        best_epoch=int(meta["best_epoch"]), tta_used_in_evaluation=bool(meta["tta"]),
        triton={"repository": TRITON, "model": triton_name(meta["backbone"])},
    )
    module = _deployable(model, meta["mean"], meta["std"])
    generator = torch.Generator().manual_seed(0)
    example = (torch.randint(0, 256, (2, 1, size, size), dtype=torch.uint8, generator=generator),)
    dynamic = {"images": {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}}
    with torch.no_grad():
        program = torch.export.export(module, example, dynamic_shapes=dynamic)
    with replacing(directory / PT2) as tmp:  # whole or not at all (a full disk leaves no cut file)
        torch.export.save(program, tmp, extra_files={METADATA: document(info, indent=None)})
    with replacing(directory / ONNX) as tmp:
        _export_onnx(module, example, dynamic, tmp, info)
    write_triton_repository(directory, info["triton"]["model"])
    write_file(directory / METADATA, document(info))
    return info


def _export_onnx(module, example, dynamic, path: Path, info: dict) -> None:
    import onnx
    import torch

    for name in ("onnxscript", "onnx_ir", "torch.onnx"):  # the exporter's pass-by-pass INFO lines
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        program = torch.onnx.export(module, example, dynamo=True, dynamic_shapes=dynamic, input_names=["images"],
                                    output_names=["probability"], verbose=False)
    proto = program.model_proto
    proto.metadata_props.add(key=METADATA, value=document(info, indent=None))
    onnx.save(proto, str(path))


def triton_name(backbone: str) -> str:
    """The Triton model name of a backbone's model: ``pneumonia-<backbone>`` in lowercase letters, digits,
    ``_`` and ``-`` (a URL path segment: ``/v2/models/<name>/infer``)."""
    return "pneumonia-" + (re.sub(r"[^a-z0-9_-]+", "-", backbone.lower()).strip("-") or "model")


# ONNX element type -> Triton data type (model_config.proto's DataType)
TRITON_TYPES = {"BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32",
                "UINT64": "TYPE_UINT64", "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32",
                "INT64": "TYPE_INT64", "FLOAT16": "TYPE_FP16", "FLOAT": "TYPE_FP32", "DOUBLE": "TYPE_FP64",
                "STRING": "TYPE_STRING", "BFLOAT16": "TYPE_BF16"}


def onnx_tensors(proto) -> list[tuple[str, str, str, list[int]]]:
    """(input|output, name, ONNX element type, shape with -1 for a dynamic axis) of each graph input and
    output of an ONNX model (weights an older exporter lists among the inputs left out)."""
    import onnx

    weights = {t.name for t in proto.graph.initializer}
    out = []
    for kind, values in (("input", proto.graph.input), ("output", proto.graph.output)):
        for v in values:
            if v.name in weights:
                continue
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in t.shape.dim]
            out.append((kind, v.name, onnx.TensorProto.DataType.Name(t.elem_type), dims))
    return out


def triton_config(proto, name: str) -> str:
    """config.pbtxt of ONNX model ``proto`` for Triton's onnxruntime backend, every input's and output's
    name, data type and shape read from the model, so config and model cannot disagree.

    A dynamic first axis on every input and output is the batch axis: Triton batches (``max_batch_size``
    > 0, dynamic batching) and ``dims`` leave it out; an output that is the batch axis alone (P(positive)
    per image) is ``dims: [ 1 ]`` reshaped to ``[ ]``, so a response holds N×1 values. Without such an
    axis, ``max_batch_size: 0`` and the full shapes. ``max_batch_size`` keeps a batch near the pixels of
    256 images at 224 px (inference.PREDICT_PIXELS), within the export's MAX_BATCH."""
    from pneumonia_kfp.inference import PREDICT_PIXELS

    tensors = onnx_tensors(proto)
    batched = all(dims and dims[0] == -1 for _, _, _, dims in tensors)
    inputs = [dims[1 if batched else 0:] for kind, _, _, dims in tensors if kind == "input"]
    pixels = max((math.prod(d) for d in inputs if d and min(d) > 0), default=1)
    max_batch = min(MAX_BATCH, max(1, PREDICT_PIXELS // pixels)) if batched else 0
    lines = [f"name: {json.dumps(name)}", 'platform: "onnxruntime_onnx"', f"max_batch_size: {max_batch}"]
    for kind in ("input", "output"):
        entries = []
        for _, tensor, dtype, dims in (t for t in tensors if t[0] == kind):
            if dtype not in TRITON_TYPES:
                raise ValueError(f"ONNX {kind} {tensor!r} has element type {dtype}, which Triton does not take")
            dims = dims[1:] if batched else dims
            entry = [f"    name: {json.dumps(tensor)}", f"    data_type: {TRITON_TYPES[dtype]}",
                     f"    dims: [ {', '.join(map(str, dims or [1]))} ]"]
            if not dims:
                entry.append("    reshape: { shape: [ ] }")
            entries.append("  {\n" + "\n".join(entry) + "\n  }")
        lines.append(f"{kind} [\n" + ",\n".join(entries) + "\n]")
    if batched:
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"


def write_triton_repository(directory: Path, name: str) -> Path:
    """``directory``/triton/<name>/: 1/model.onnx (the model directory's model.onnx, hard-linked, or copied
    where links are not allowed) and config.pbtxt made from that file. Returns the model's folder."""
    import onnx

    folder = directory / TRITON / name
    (folder / TRITON_VERSION).mkdir(parents=True, exist_ok=True)
    with replacing(folder / TRITON_VERSION / ONNX) as tmp:
        try:
            os.link(directory / ONNX, tmp)
        except OSError:  # a filesystem without hard links (some network and FUSE mounts)
            shutil.copyfile(directory / ONNX, tmp)
    proto = onnx.load(str(folder / TRITON_VERSION / ONNX), load_external_data=False)
    write_file(folder / TRITON_CONFIG, triton_config(proto, name))
    return folder


def load_pt2(path: str | Path):
    """(callable module, metadata) of a model.pt2."""
    import torch

    extra = {METADATA: ""}
    program = torch.export.load(str(path), extra_files=extra)
    return program.module(), read_model_info(json.loads(extra[METADATA]), f"{path} ({METADATA})")


def load_onnx(path: str | Path):
    """(onnxruntime CPU session, metadata) of a model.onnx; ``session.run(None, {"images": x})[0]``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    info = json.loads(session.get_modelmeta().custom_metadata_map[METADATA])
    return session, read_model_info(info, f"{path} ({METADATA})")
