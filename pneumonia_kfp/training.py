"""train: one backbone on a stored dataset; best epoch and threshold chosen on validation.

The pieces: ``train_val_split`` (which images validate), ``Recipe`` (how the model learns beyond
the run parameters), ``TrainingState`` (what a restarted task resumes from, its checkpoint keys
listed once), ``run_epoch`` (one pass over the training images), ``validate`` (validation
probability, loss and AUC) and ``select`` (the validation-chosen thresholds of the kept epoch).
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass

import numpy as np

from pneumonia_kfp import resume
from pneumonia_kfp.data import DataError, StoredDataset, grouped_holdout, groups_of
from pneumonia_kfp.params import check_run_params, default

log = logging.getLogger(__name__)
MIN_VAL_IMAGES = 100
VAL_FRACTION = 0.1


def train_val_split(ds: StoredDataset, seed: int):
    """(train images, labels), (val images, labels, manifest entries), and how val was made.

    The dataset's own val split when it has at least MIN_VAL_IMAGES; otherwise train and that
    small val are pooled and a patient-grouped, class-stratified val is carved from the pool.
    """
    tx, ty, te = ds.split("train")
    vx, vy, ve = ds.split("val")
    if len(vy) >= MIN_VAL_IMAGES:
        return (tx, ty), (vx, vy, ve), "dataset val split"
    if len(vy):
        tx, ty, te = np.concatenate([tx, vx]), np.concatenate([ty, vy]), te + ve
    held = grouped_holdout(ty, groups_of(te), VAL_FRACTION, seed)
    how = f"carved from train: {held.sum()} images, grouped by patient (dataset val had {len(vy)} < {MIN_VAL_IMAGES})"
    log.warning("validation set %s", how)
    val_entries = [e for e, h in zip(te, held, strict=True) if h]
    return (tx[~held], ty[~held]), (tx[held], ty[held], val_entries), how


@dataclass(frozen=True)
class Recipe:
    """How a model learns, beyond the run parameters (the ablation table's variables).

    Defaults follow chest X-ray practice for robustness to other hospitals' images: photometric and
    geometric augmentation, label smoothing 0.1 (Szegedy et al. 2016; Müller et al. 2019), and
    selection on an exponential moving average of the weights (timm's ModelEmaV3 with warm-up).
    """
    augmentation: str = "default"  # a name in augmentation.POLICIES
    label_smoothing: float = 0.1
    ema: bool = True


def to_device(array, device):
    """numpy -> tensor on ``device``, one blocking copy. Not through pinned memory: torch's pinned-memory
    cache would keep a pinned copy of the whole training set for the rest of the run."""
    import torch

    return torch.from_numpy(array).to(device)


def training_batch(images, idx, generator, mean: float, std: float, policy="default"):
    """Augmented, normalised float batch from the device-resident uint8 images (no host round trip)."""
    import torch

    from pneumonia_kfp.augmentation import POLICIES, augment, normalize

    x = normalize(augment(images[idx], generator, POLICIES[policy] if isinstance(policy, str) else policy), mean, std)
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


def training_step(model, x, y, loss_fn, optimizer, scaler):
    """One optimisation step under autocast; returns the detached loss (no device sync)."""
    from pneumonia_kfp.device import autocast

    with autocast(x.device):
        loss = loss_fn(model(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


class TrainingState:
    """What a restarted task needs to carry on after its last finished epoch, and nothing else.

    ``CHECKPOINT_KEYS`` is the one list of what goes into (and comes out of) ``last.pt``.
    """
    OBJECTS = ("model", "ema", "optimizer", "scheduler", "scaler")  # each has state_dict()/load_state_dict()
    VALUES = ("epoch", "history", "best", "train_seconds")
    RNG = ("generator", "cpu_rng")
    CHECKPOINT_KEYS = OBJECTS + VALUES + RNG

    def __init__(self, model, ema, optimizer, scheduler, scaler, generator):
        self.model, self.ema, self.optimizer, self.scheduler, self.scaler = model, ema, optimizer, scheduler, scaler
        self.generator = generator
        self.epoch, self.history, self.best, self.train_seconds = 0, [], None, 0.0

    @property
    def eval_model(self):
        """The weights validated and kept: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def state_dict(self) -> dict:
        import torch

        state = {k: None if getattr(self, k) is None else getattr(self, k).state_dict() for k in self.OBJECTS}
        state.update({k: getattr(self, k) for k in self.VALUES})
        state.update(generator=self.generator.get_state(), cpu_rng=torch.get_rng_state())
        return state

    def load_state_dict(self, saved: dict) -> None:
        import torch

        missing = sorted(set(self.CHECKPOINT_KEYS) - set(saved))
        if missing:
            raise DataError(f"saved training state lacks {', '.join(missing)}")
        for k in self.OBJECTS:
            if getattr(self, k) is not None:
                getattr(self, k).load_state_dict(saved[k])
        for k in self.VALUES:
            setattr(self, k, saved[k])
        self.generator.set_state(saved["generator"].cpu())  # RNG states live on the CPU whatever the device
        torch.set_rng_state(saved["cpu_rng"].cpu())


@dataclass
class EpochPlan:
    """What every epoch of one training run shares."""
    name: str
    epochs: int
    images: object  # uint8 N×1×S×S on the device
    labels: object
    batch_size: int
    mean: float
    std: float
    policy: str
    loss_fn: object
    step_model: object  # the model, or its torch.compile'd form

    @property
    def steps(self) -> int:
        return max(1, len(self.images) // self.batch_size)


def run_epoch(state: TrainingState, plan: EpochPlan) -> dict:
    """One pass over the training images; the row's throughput counts the images actually seen."""
    import torch

    from pneumonia_kfp.telemetry import progress

    state.model.train()
    device = plan.images.device
    start, total_loss, seen = time.perf_counter(), torch.zeros((), device=device), 0
    order = torch.randperm(len(plan.images), device=device, generator=state.generator)
    first_step = (state.epoch) * plan.steps
    for step in progress(range(plan.steps), desc=f"{plan.name} epoch {state.epoch + 1}/{plan.epochs}", unit="batch"):
        idx = order[step * plan.batch_size:(step + 1) * plan.batch_size]
        x = training_batch(plan.images, idx, state.generator, plan.mean, plan.std, plan.policy)
        total_loss += training_step(plan.step_model, x, plan.labels[idx], plan.loss_fn, state.optimizer,
                                    state.scaler)
        state.scheduler.step()
        if state.ema is not None:
            state.ema.update(state.model, step=first_step + step + 1)
        seen += len(idx)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"epoch": state.epoch + 1, "train_loss": total_loss.item() / plan.steps, "images": seen,
            "seconds": seconds, "images_per_second": seen / seconds}


def validate(model, images, labels, mean: float, std: float, tta: bool = False) -> dict:
    """Validation probability of the positive class, loss (binary cross-entropy) and AUC."""
    import torch

    from pneumonia_kfp.inference import predict
    from pneumonia_kfp.metrics import auc

    prob = predict(model, images, mean, std, tta=tta)
    loss = float(torch.nn.functional.binary_cross_entropy(
        torch.from_numpy(prob).double().clamp(1e-7, 1 - 1e-7), torch.from_numpy(labels).double()))
    return {"prob": prob, "val_loss": loss, "val_auc": auc(labels, prob)}


def build_state(backbone: str, device, plan_steps: int, epochs: int, learning_rate: float, seed: int,
                recipe: Recipe, pretrained: bool, weights: str) -> TrainingState:
    import torch

    from pneumonia_kfp.backbones import create_backbone
    from pneumonia_kfp.device import amp_dtype

    model = create_backbone(backbone, num_classes=2, pretrained=pretrained, weights=weights).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ema = None
    if recipe.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=0.9998, use_warmup=True)
    # fused: the step counts and the grad scaler's inf check stay on the device (no read-back each step)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4, fused=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=epochs * plan_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device) == torch.float16)
    generator = torch.Generator(device=device).manual_seed(seed)
    return TrainingState(model, ema, optimizer, scheduler, scaler, generator)


def select(state: TrainingState, vx, vy, val_entries, classes, mean, std, threshold_rule: str, tta: bool,
           seed: int) -> dict:
    """Load the kept epoch's weights; its validation predictions, thresholds of every rule and report."""
    from pneumonia_kfp.inference import predictions_block
    from pneumonia_kfp.metrics import classification_report, thresholds

    model = state.model
    model.load_state_dict(state.best["state"])
    prob = validate(model, vx, vy, mean, std, tta=True)["prob"] if tta else state.best["prob"].cpu().numpy()
    rules = thresholds(vy, prob)
    return {
        "threshold_rule": threshold_rule, "threshold": rules[threshold_rule], "thresholds": rules, "tta": tta,
        "val": classification_report(vy, prob, rules[threshold_rule], classes, ci_seed=seed,
                                     groups=groups_of(val_entries)),
        "val_predictions": predictions_block(val_entries, vy, prob),
    }


def improves(row: dict, best: dict | None) -> bool:
    """Whether an epoch beats the best so far: higher validation AUC; on equal AUC, lower validation loss
    (an earlier epoch keeps its place on a full tie)."""
    return best is None or (row["val_auc"], -row["val_loss"]) > (best["val_auc"], -best["val_loss"])


def train(
    dataset_uri: str, backbone: str, checkpoint_path: str, epochs: int = default("epochs"),
    batch_size: int = default("batch_size"), learning_rate: float = default("learning_rate"),
    seed: int = default("seed"), pretrained: bool = False, weights: str = "", compile_model: bool = False,
    threshold_rule: str = default("threshold_rule"), tta: bool = default("tta"), recipe: Recipe = Recipe(),
) -> dict:
    """Train, keep the epoch with the best validation AUC, pick the thresholds on validation.

    Writes the checkpoint to ``checkpoint_path`` and returns its metadata (history, timings,
    validation metrics at the ``threshold_rule`` threshold, every rule's threshold).
    """
    import torch

    from pneumonia_kfp import device as devices
    from pneumonia_kfp.backbones import grayscale_normalization, save_checkpoint
    from pneumonia_kfp.telemetry import TrainTelemetry

    check_run_params({"backbones": [backbone], "epochs": epochs, "batch_size": batch_size,
                      "learning_rate": learning_rate, "seed": seed, "threshold_rule": threshold_rule, "tta": tta})
    device = devices.select_device()  # first: a GPU task without a usable GPU fails before any work
    torch.manual_seed(seed)
    ds = StoredDataset(dataset_uri)
    if len(ds.classes) != 2:
        raise DataError(f"{dataset_uri} has classes {ds.classes}: this pipeline classifies exactly 2")
    (tx, ty), (vx, vy, val_entries), val_source = train_val_split(ds, seed)

    # the whole uint8 training set lives on the device; batches are indexed there
    images, labels = to_device(tx, device), to_device(ty, device)
    counts = torch.bincount(labels, minlength=2).float()
    class_weight = counts.sum() / (2 * counts.clamp(min=1))  # balanced: rare class weighs more
    plan = EpochPlan(backbone, epochs, images, labels, batch_size, 0.0, 1.0, recipe.augmentation,
                     torch.nn.CrossEntropyLoss(weight=class_weight, label_smoothing=recipe.label_smoothing), None)
    state = build_state(backbone, device, plan.steps, epochs, learning_rate, seed, recipe, pretrained, weights)
    plan.mean, plan.std = grayscale_normalization(state.model)
    plan.step_model = torch.compile(state.model) if compile_model else state.model

    states = resume.state_store(dataset_uri, {
        "backbone": backbone, "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
        "seed": seed, "pretrained": pretrained, "weights": weights, "recipe": asdict(recipe),
        **devices.identity(device),
    })
    saved = resume.load(states)
    if saved:  # a restarted task (preempted pod, retry): carry on after the last finished epoch
        state.load_state_dict(saved)
        log.warning("%s: resuming after epoch %d from %s", backbone, state.epoch, states.uri_of("last.pt"))
    # Prometheus pushgateway, when configured; a resumed run's earlier epochs count too
    telemetry = TrainTelemetry(backbone, epochs, history=state.history,
                               samples_per_epoch=min(plan.steps * batch_size, len(images)))
    while state.epoch < epochs:
        row = run_epoch(state, plan)
        val = validate(state.eval_model, vx, vy, plan.mean, plan.std)
        row.update(val_loss=val["val_loss"], val_auc=val["val_auc"])
        state.history.append(row)
        state.train_seconds += row["seconds"]
        state.epoch = row["epoch"]
        telemetry.epoch_done(row, samples=row["images"])
        best = state.best
        if improves(row, best):
            state.best = {**row, "state": copy.deepcopy(state.eval_model.state_dict()),
                          "prob": torch.from_numpy(val["prob"])}
        resume.save(states, state.state_dict())
        log.info("%s epoch %d/%d  loss %.4f  val_loss %.4f  val_auc %.4f  %.0f img/s", backbone, state.epoch,
                 epochs, row["train_loss"], row["val_loss"], row["val_auc"], row["images_per_second"])

    chosen = select(state, vx, vy, val_entries, ds.classes, plan.mean, plan.std, threshold_rule, tta, seed)
    meta = {
        "backbone": backbone, "classes": ds.classes, "image_size": int(tx.shape[-1]),
        "mean": plan.mean, "std": plan.std, "epochs": epochs, "best_epoch": state.best["epoch"],
        "pretrained": pretrained, "dataset_uri": dataset_uri, "val_source": val_source, "recipe": asdict(recipe),
        "seconds": state.train_seconds,
        "images_per_second": sum(r["images"] for r in state.history) / state.train_seconds,
        "history": state.history, "device": str(device), **chosen,
    }
    save_checkpoint(checkpoint_path, state.model, **meta)
    telemetry.done()
    return meta
