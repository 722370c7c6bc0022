"""train step on many nodes (settings nodes > 1): launches a TrainJob or PyTorchJob and waits for it."""
from kfp import dsl

from pneumonia_kfp.components.kfp_defaults import component


@component
def train_distributed_op(
    dataset: dsl.Input[dsl.Dataset], backbone: str, epochs: int, batch_size: int, learning_rate: float,
    seed: int, pretrained: bool, pretrained_weights: str, compile_model: bool, threshold_rule: str, tta: bool,
    job: str, model: dsl.Output[dsl.Model],
):
    """Train one timm backbone as a distributed job of torchrun processes on several nodes.

    Args:
        dataset: the ingested dataset version (its metadata carries the store URI).
        backbone: timm model name, e.g. resnet18.
        epochs: training epochs; the epoch with the best validation AUC is kept.
        batch_size: images per optimisation step.
        learning_rate: peak learning rate of the one-cycle schedule.
        seed: seed of weights, batch order, augmentation and the validation carve.
        pretrained: start from ImageNet weights (timm hub, or pretrained_weights).
        pretrained_weights: one file, a directory of <backbone>.safetensors, or backbone=FILE,...; empty: the hub.
        compile_model: torch.compile the model for training.
        threshold_rule: which validation-chosen threshold is the default (balanced, youden, sensitivity95).
        tta: predict with test-time augmentation (validation thresholds and evaluation alike).
        job: the job's engine, nodes, GPUs and scheduling (JSON, fixed by the compile's settings).
        model: the same directory as the one-GPU train step's, written by rank 0 of the job.
    """
    from pneumonia_kfp.task_errors import recording_errors

    with recording_errors("train-distributed-op"):
        import logging

        from pneumonia_kfp.job_launcher import run_training_job

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        params = dict(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                      pretrained=pretrained, weights=pretrained_weights, compile_model=compile_model,
                      threshold_rule=threshold_rule, tta=tta)
        metadata = run_training_job(job, dataset.metadata["uri"], backbone, model.path, model.uri, params)
        model.metadata.update(metadata)
