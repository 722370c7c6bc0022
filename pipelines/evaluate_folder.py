"""``pneumonia-kfp evaluate``: a trained model scored on any ImageFolder, written as a run's documents.

It sits above the library's layers: it scores with ``evaluation`` and renders with ``report``.
"""
from __future__ import annotations

from pathlib import Path


def evaluate_folder(model_path: str, data: str, output: str | Path) -> dict:
    """Score a trained model on any ImageFolder; write OUT/results.json, report.md, report.html and
    predictions.csv in the pipeline's contract. A folder of one class is scored with the figures that
    need both classes (specificity or sensitivity, AUC) left undefined (null), and a warning."""
    from pneumonia_kfp import evaluation
    from pneumonia_kfp.device import select_device
    from pneumonia_kfp.image_reader import read_labelled_folder
    from pneumonia_kfp.inference import predict, predictions_block
    from pneumonia_kfp.report import render, write_outputs

    model, meta = evaluation.load_model(model_path, select_device())
    x, y, entries = read_labelled_folder(data, meta["image_size"], meta["classes"])  # as ingest reads
    counts = {c: int((y == i).sum()) for i, c in enumerate(meta["classes"])}
    evaluation.warn_one_class(data, y, meta["classes"])
    prob = predict(model, x, meta["mean"], meta["std"], meta["tta"])
    doc = evaluation.model_document(meta, sum(p.numel() for p in model.parameters()),
                                    {"test": predictions_block(entries, y, prob)})
    dataset = {"uri": str(data), "classes": meta["classes"], "counts": {"test": counts},
               "external": True, "model": str(model_path)}
    full = evaluation.combine(dataset, [doc])
    results, md, page, csv = render(full, images={e["path"]: img for e, img in zip(entries, x, strict=True)})
    write_outputs(Path(output), results, md, page, csv)
    return results
