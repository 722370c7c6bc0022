"""export: a trained model as one directory -- the checkpoint and two serving forms.

    <model dir>/checkpoint.pt    the selected epoch's weights and metadata (train writes it)
    <model dir>/model.pt2        torch.export program: ``torch.export.load(path).module()``
    <model dir>/model.onnx       ONNX (opset from torch's dynamo exporter), for onnxruntime & co.
    <model dir>/metadata.json    classes, validation-chosen threshold(s), image size, backbone

Both serving forms take what ingest stores -- uint8 images, N×1×S×S, S = the training image size,
any N -- and return the probability of the positive class (normalisation and softmax inside), so
a consumer needs no timm and no project code. The metadata also travels inside each file
(``extra_files`` of the .pt2, ``metadata_props`` of the ONNX model). TorchScript is gone: torch
deprecates it in favour of ``torch.export``, and nothing here needed it.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

from pneumonia_kfp.outputs import document, replacing, write_file

CHECKPOINT, PT2, ONNX, METADATA = "checkpoint.pt", "model.pt2", "model.onnx", "metadata.json"
FORMATS = {"torch.export": PT2, "onnx": ONNX}
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


def export_model(directory: str | Path) -> dict:
    """Write model.pt2, model.onnx and metadata.json beside ``directory``'s checkpoint; returns the metadata."""
    import torch

    from pneumonia_kfp.backbones import load_checkpoint

    directory = Path(directory)
    model, meta = load_checkpoint(directory / CHECKPOINT, "cpu")
    size = int(meta["image_size"])
    info = {
        "formats": FORMATS, "backbone": meta["backbone"], "classes": list(meta["classes"]),
        "positive_class": meta["classes"][1], "threshold": float(meta["threshold"]),
        "threshold_rule": meta.get("threshold_rule"), "thresholds": meta.get("thresholds"), "image_size": size,
        "input": f"uint8 N×1×{size}×{size}", "output": f"P({meta['classes'][1]}), N",
        "best_epoch": int(meta["best_epoch"]), "tta_used_in_evaluation": bool(meta.get("tta", False)),
    }
    module = _deployable(model, meta["mean"], meta["std"])
    generator = torch.Generator().manual_seed(0)
    example = (torch.randint(0, 256, (2, 1, size, size), dtype=torch.uint8, generator=generator),)
    dynamic = {"images": {0: torch.export.Dim("batch", min=1, max=65536)}}
    with torch.no_grad():
        program = torch.export.export(module, example, dynamic_shapes=dynamic)
    with replacing(directory / PT2) as tmp:  # whole or not at all (a full disk leaves no cut file)
        torch.export.save(program, tmp, extra_files={METADATA: document(info, indent=None)})
    with replacing(directory / ONNX) as tmp:
        _export_onnx(module, example, dynamic, tmp, info)
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


def load_pt2(path: str | Path):
    """(callable module, metadata) of a model.pt2."""
    import torch

    extra = {METADATA: ""}
    program = torch.export.load(str(path), extra_files=extra)
    return program.module(), json.loads(extra[METADATA])


def load_onnx(path: str | Path):
    """(onnxruntime CPU session, metadata) of a model.onnx; ``session.run(None, {"images": x})[0]``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session, json.loads(session.get_modelmeta().custom_metadata_map[METADATA])
