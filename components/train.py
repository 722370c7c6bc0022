"""train step: one timm backbone; best epoch and thresholds chosen on validation; exported forms."""
from kfp import dsl

from pneumonia_kfp.components.kfp_defaults import component


@component
def train_op(
    dataset: dsl.Input[dsl.Dataset], backbone: str, epochs: int, batch_size: int, learning_rate: float,
    seed: int, pretrained: bool, pretrained_weights: str, compile_model: bool, threshold_rule: str, tta: bool,
    model: dsl.Output[dsl.Model],
):
    """Train one timm backbone on the ingested dataset (GPU with AMP when present; with several GPUs, or
    run-local --ranks N, one torchrun rank each, DDP).

    Args:
        dataset: the ingested dataset version (its metadata carries the store URI).
        backbone: timm model name, e.g. resnet18.
        epochs: training epochs; the epoch with the best validation AUC is kept.
        batch_size: images per optimisation step.
        learning_rate: peak learning rate of the one-cycle schedule.
        seed: seed of weights, batch order, augmentation and the validation carve.
        pretrained: start from ImageNet weights (timm hub, or pretrained_weights).
        pretrained_weights: for air-gapped clusters: one file (one backbone), a directory of
            <backbone>.safetensors, or backbone=FILE,...; a path or store URI; empty: the hub.
        compile_model: torch.compile the model for training.
        threshold_rule: which validation-chosen threshold is the default (balanced, youden, sensitivity95).
        tta: predict with test-time augmentation (validation thresholds and evaluation alike).
        model: a directory: checkpoint.pt (the selected epoch, thresholds, validation predictions),
            model.pt2 (torch.export) and model.onnx (uint8 images in, P(positive) out), metadata.json.
    """
    from pneumonia_kfp.task_errors import recording_errors

    with recording_errors("train-op"):
        import logging
        import os

        from pneumonia_kfp.distributed import run_ranks, task_ranks
        from pneumonia_kfp.export import CHECKPOINT, export_model
        from pneumonia_kfp.train_worker import MODEL_METADATA
        from pneumonia_kfp.training import train

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        os.makedirs(model.path, exist_ok=True)
        params = dict(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                      pretrained=pretrained, weights=pretrained_weights, compile_model=compile_model,
                      threshold_rule=threshold_rule, tta=tta)
        ranks = task_ranks()  # one per GPU of the task (or run-local's --ranks): torchrun, DDP
        if ranks > 1:
            model.metadata.update(run_ranks(ranks, dataset.metadata["uri"], backbone, model.path, params))
            return
        meta = train(dataset.metadata["uri"], backbone, os.path.join(model.path, CHECKPOINT), **params)
        model.metadata.update({k: meta[k] for k in MODEL_METADATA})
        model.metadata["formats"] = export_model(model.path)["formats"]
