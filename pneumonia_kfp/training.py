"""train: one backbone on a stored dataset; best epoch and threshold chosen on validation.

``train`` is ``load`` (the stored dataset's training and validation arrays, ``train_val_split``
choosing which images validate) then ``fit`` (the model learned from those arrays). The pieces of
``fit``: ``Recipe`` (how the model learns beyond the run parameters), ``TrainingState`` (what a
restarted task resumes from, its checkpoint keys listed once), ``run_epoch`` (one pass over the
training images), ``validate`` (validation probability, loss and AUC) and ``select`` (the
validation-chosen thresholds of the kept epoch).
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from pneumonia_kfp import resume
from pneumonia_kfp.data import DataError, StoredDataset, grouped_holdout, groups_of
from pneumonia_kfp.documents import VAL_FROM_DATASET, checkpoint_meta
from pneumonia_kfp.params import RECIPE_DEFAULTS, check_run_params, default

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
        return (tx, ty), (vx, vy, ve), VAL_FROM_DATASET
    if len(vy):
        tx, ty, te = np.concatenate([tx, vx]), np.concatenate([ty, vy]), te + ve
    held = grouped_holdout(ty, groups_of(te), VAL_FRACTION, seed)
    how = f"carved from train: {held.sum()} images, grouped by patient (dataset val had {len(vy)} < {MIN_VAL_IMAGES})"
    log.warning("validation set %s", how)
    val_entries = [e for e, h in zip(te, held, strict=True) if h]
    return (tx[~held], ty[~held]), (tx[held], ty[held], val_entries), how


@dataclass(frozen=True)
class Split:
    """One split's arrays: uint8 N×1×S×S images, their labels (class indices) and, for validation, the
    manifest entries (file, patient) its predictions are recorded with."""
    images: np.ndarray
    labels: np.ndarray
    entries: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class TrainingData:
    train: Split
    val: Split
    class_names: list[str]
    val_source: str  # how the validation images were chosen, recorded with the model


def load(dataset_uri: str, seed: int) -> TrainingData:
    """The stored dataset's training and validation arrays (``train_val_split``: which images validate)."""
    ds = StoredDataset(dataset_uri)
    if len(ds.classes) != 2:
        raise DataError(f"{dataset_uri} has classes {ds.classes}: this pipeline classifies exactly 2")
    (tx, ty), (vx, vy, val_entries), val_source = train_val_split(ds, seed)
    return TrainingData(Split(tx, ty), Split(vx, vy, val_entries), ds.classes, val_source)


@dataclass(frozen=True)
class Recipe:
    """How a model learns, beyond the run parameters (the ablation table's variables); the defaults and
    why are params.RECIPE_DEFAULTS. ``record`` is what results.json shows."""
    augmentation: str = RECIPE_DEFAULTS["augmentation"]  # a name in augmentation.POLICIES
    label_smoothing: float = RECIPE_DEFAULTS["label_smoothing"]
    weight_decay: float = RECIPE_DEFAULTS["weight_decay"]  # AdamW's (decoupled)
    ema: bool = RECIPE_DEFAULTS["ema"]  # validate and keep a moving average of the weights
    ema_decay: float = RECIPE_DEFAULTS["ema_decay"]  # ModelEmaV3's, with warm-up

    def record(self) -> dict:
        """The recipe with its augmentation policy's strengths spelled out (None: no augmentation)."""
        from pneumonia_kfp.augmentation import POLICIES

        policy = POLICIES[self.augmentation]
        return {**asdict(self), "augmentation_strengths": None if policy is None else asdict(policy)}


def training_batch(images, idx, generator, mean: float, std: float, policy="default"):
    """Augmented, normalised float batch of rows ``idx`` of the device-resident uint8 images: one process's
    training step's batch (``distributed.batch_of``), for the benchmarks."""
    from pneumonia_kfp.distributed import Step, batch_of

    return batch_of(Step(None, None, None, images, len(idx), rows=idx), generator, mean, std, policy)


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


@dataclass(frozen=True)
class EpochPlan:
    """What every epoch of one training run shares."""
    name: str
    epochs: int
    data: object  # distributed.TrainShard: this rank's training images, every label
    batch_size: int  # the global batch, split across the ranks
    mean: float
    std: float
    policy: str
    loss: object  # distributed.GlobalBatchLoss
    step_model: object  # the model, its DDP wrapper, or their torch.compile'd form

    @property
    def steps(self) -> int:
        return max(1, self.data.count // self.batch_size)


def run_epoch(state: TrainingState, plan: EpochPlan) -> dict:
    """One pass over the training images; the row's throughput counts the images actually seen."""
    import torch

    from pneumonia_kfp.distributed import batch_of
    from pneumonia_kfp.telemetry import progress

    state.model.train()
    device = plan.data.device
    start, total_loss, seen = time.perf_counter(), torch.zeros((), device=device), 0
    # every rank draws the same order and augmentation (the global batch's): distributed.py's rule
    order = torch.randperm(plan.data.count, device=device, generator=state.generator)
    first_step = (state.epoch) * plan.steps
    steps = plan.data.epoch(order, plan.batch_size, plan.steps)
    for step in progress(range(plan.steps), desc=f"{plan.name} epoch {state.epoch + 1}/{plan.epochs}", unit="batch"):
        rows = next(steps)
        x = batch_of(rows, state.generator, plan.mean, plan.std, plan.policy)
        total_loss += training_step(plan.step_model, x, rows.labels, plan.loss.of_batch(rows.batch_labels),
                                    state.optimizer, state.scaler)
        state.scheduler.step()
        if state.ema is not None:
            state.ema.update(state.model, step=first_step + step + 1)
        seen += rows.count  # the global batch: every rank counts the images all of them saw
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"epoch": state.epoch + 1, "train_loss": total_loss.item() / plan.steps, "images": seen,
            "seconds": seconds, "images_per_second": seen / seconds, "world_size": plan.data.world.size}


def validate(model, images, labels, mean: float, std: float, tta: bool = False, world=None) -> dict:
    """Validation probability of the positive class, loss (binary cross-entropy) and AUC; with several
    ranks each predicts its part and every rank gets the whole (so all choose alike)."""
    import torch

    from pneumonia_kfp.distributed import SOLO, predict_all
    from pneumonia_kfp.metrics import auc

    prob = predict_all(model, images, mean, std, tta, world or SOLO)
    loss = float(torch.nn.functional.binary_cross_entropy(
        torch.from_numpy(prob).double().clamp(1e-7, 1 - 1e-7), torch.from_numpy(labels).double()))
    return {"prob": prob, "val_loss": loss, "val_auc": auc(labels, prob)}


def build_state(backbone: str, device, plan_steps: int, epochs: int, learning_rate: float, seed: int,
                recipe: Recipe, pretrained: bool, weights: str, world=None) -> TrainingState:
    import torch

    from pneumonia_kfp.backbones import create_backbone
    from pneumonia_kfp.device import amp_dtype
    from pneumonia_kfp.inference import device_layout

    model = device_layout(create_backbone(backbone, num_classes=2, pretrained=pretrained, weights=weights).to(device),
                          device)
    if world is not None and world.size > 1:  # BatchNorm over the global batch, as one process would
        from pneumonia_kfp.distributed import sync_batchnorm

        model = sync_batchnorm(model, device)
    ema = None
    if recipe.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=recipe.ema_decay, use_warmup=True)
    # fused: the step counts and the grad scaler's inf check stay on the device (no read-back each step)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=recipe.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=epochs * plan_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device) == torch.float16)
    generator = torch.Generator(device=device).manual_seed(seed)
    return TrainingState(model, ema, optimizer, scheduler, scaler, generator)


def select(state: TrainingState, val: Split, class_names: list[str], mean, std, threshold_rule: str, tta: bool,
           seed: int, world=None) -> dict:
    """Load the kept epoch's weights; its validation predictions, thresholds of every rule and report."""
    from pneumonia_kfp.inference import predictions_block
    from pneumonia_kfp.metrics import classification_report, thresholds

    model = state.model
    model.load_state_dict(state.best["state"])
    prob = validate(model, val.images, val.labels, mean, std, tta=True, world=world)["prob"] if tta \
        else state.best["prob"].cpu().numpy()
    rules = thresholds(val.labels, prob)
    return {
        "threshold_rule": threshold_rule, "threshold": rules[threshold_rule], "thresholds": rules, "tta": tta,
        "val": classification_report(val.labels, prob, rules[threshold_rule], class_names, ci_seed=seed,
                                     groups=groups_of(val.entries)),
        "val_predictions": predictions_block(val.entries, val.labels, prob),
    }


def improves(row: dict, best: dict | None) -> bool:
    """Whether an epoch beats the best so far: higher validation AUC; on equal AUC, lower validation loss
    (an earlier epoch keeps its place on a full tie)."""
    return best is None or (row["val_auc"], -row["val_loss"]) > (best["val_auc"], -best["val_loss"])


@dataclass(frozen=True)
class Run:
    """The run parameters one model's fit takes (params' names and defaults)."""
    backbone: str
    epochs: int = default("epochs")
    batch_size: int = default("batch_size")
    learning_rate: float = default("learning_rate")
    seed: int = default("seed")
    pretrained: bool = default("pretrained")
    weights: str = default("pretrained_weights")
    compile_model: bool = default("compile_model")
    threshold_rule: str = default("threshold_rule")
    tta: bool = default("tta")


def fit(train: Split, val: Split, recipe: Recipe, run: Run, device, class_names: list[str], states=None,
        world=None):
    """Learn ``run.backbone`` from ``train``, keep the epoch with the best validation AUC and pick the
    thresholds on ``val``. ``states``: where the training state is saved after every epoch and resumed
    from (resume.state_store), None: nowhere. Returns (the model with the kept epoch's weights, its record:
    normalisation, best epoch, timings, history and ``select``'s thresholds and validation figures).
    ``world``: this process's rank among torchrun's (distributed.py: the sharding, batch and writer rules)."""
    import torch

    from pneumonia_kfp import distributed
    from pneumonia_kfp.backbones import grayscale_normalization
    from pneumonia_kfp.telemetry import TrainTelemetry

    world = world or distributed.SOLO
    distributed.check_batch(run.batch_size, world)
    torch.manual_seed(run.seed)
    # this rank's uint8 training images live on its device (batches are indexed there), or, past the
    # device's data budget, in host memory
    data = distributed.TrainShard(train.images, train.labels, world, device, distributed.device_budget(device))
    steps = max(1, data.count // run.batch_size)
    state = build_state(run.backbone, device, steps, run.epochs, run.learning_rate, run.seed, recipe, run.pretrained,
                        run.weights, world)
    mean, std = grayscale_normalization(state.model)
    step_model = distributed.data_parallel(state.model, device, world)
    plan = EpochPlan(run.backbone, run.epochs, data, run.batch_size, mean, std, recipe.augmentation,
                     distributed.GlobalBatchLoss(balanced_loss(data.labels, recipe.label_smoothing), world),
                     torch.compile(step_model) if run.compile_model else step_model)
    saved = resume.load(states) if states is not None else None
    if saved:  # a restarted task (preempted pod, retry): carry on after the last finished epoch
        state.load_state_dict(saved)
        log.warning("%s: resuming after epoch %d from %s", run.backbone, state.epoch, states.uri_of("last.pt"))
    # Prometheus pushgateway, when configured; a resumed run's earlier epochs count too
    # rank 0 alone pushes ("" turns pushing off): the figures are the global batch's on every rank
    telemetry = TrainTelemetry(run.backbone, run.epochs, gateway=None if world.main else "", history=state.history,
                               samples_per_epoch=min(plan.steps * run.batch_size, data.count))
    while state.epoch < run.epochs:
        row = fit_epoch(state, plan, val)
        telemetry.epoch_done(row, samples=row["images"])
        if states is not None and world.main:  # one writer; the state is the same on every rank
            resume.save(states, state.state_dict())
        # after the save: a task killed once this line is out resumes after this epoch
        log.info("%s epoch %d/%d  loss %.4f  val_loss %.4f  val_auc %.4f  %.0f img/s", run.backbone, state.epoch,
                 run.epochs, row["train_loss"], row["val_loss"], row["val_auc"], row["images_per_second"])
    telemetry.done()
    chosen = select(state, val, class_names, mean, std, run.threshold_rule, run.tta, run.seed, world)
    return state.model, {
        "mean": mean, "std": std, "best_epoch": state.best["epoch"], "seconds": state.train_seconds,
        "images_per_second": sum(r["images"] for r in state.history) / state.train_seconds,
        "history": state.history, **chosen,
    }


def balanced_loss(labels, label_smoothing: float):
    """Cross-entropy with class weights that make both classes weigh the same (the rare class weighs more)."""
    import torch

    counts = torch.bincount(labels, minlength=2).float()
    return torch.nn.CrossEntropyLoss(weight=counts.sum() / (2 * counts.clamp(min=1)), label_smoothing=label_smoothing)


def fit_epoch(state: TrainingState, plan: EpochPlan, val: Split) -> dict:
    """One epoch and its validation; the state's history, clock and best epoch updated. Returns its row."""
    import torch

    row = run_epoch(state, plan)
    scored = validate(state.eval_model, val.images, val.labels, plan.mean, plan.std, world=plan.data.world)
    row.update(val_loss=scored["val_loss"], val_auc=scored["val_auc"])
    state.history.append(row)
    state.train_seconds += row["seconds"]
    state.epoch = row["epoch"]
    if improves(row, state.best):
        state.best = {**row, "state": copy.deepcopy(state.eval_model.state_dict()),
                      "prob": torch.from_numpy(scored["prob"])}
    return row


def train(
    dataset_uri: str, backbone: str, checkpoint_path: str, epochs: int = default("epochs"),
    batch_size: int = default("batch_size"), learning_rate: float = default("learning_rate"),
    seed: int = default("seed"), pretrained: bool = default("pretrained"), weights: str = default("pretrained_weights"),
    compile_model: bool = default("compile_model"), threshold_rule: str = default("threshold_rule"),
    tta: bool = default("tta"), recipe: Recipe = Recipe(),
) -> dict:
    """``load`` the stored dataset, ``fit`` the backbone, write the checkpoint to ``checkpoint_path``.

    Returns the checkpoint's metadata (history, timings, validation metrics at the ``threshold_rule``
    threshold, every rule's threshold). A restarted task resumes from its last finished epoch.
    """
    from pneumonia_kfp import device as devices
    from pneumonia_kfp import distributed
    from pneumonia_kfp.backbones import save_checkpoint

    check_run_params({"backbones": [backbone], "epochs": epochs, "batch_size": batch_size,
                      "learning_rate": learning_rate, "seed": seed, "threshold_rule": threshold_rule, "tta": tta})
    device = devices.select_device()  # first: a GPU task without a usable GPU fails before any work
    data = load(dataset_uri, seed)
    run = Run(backbone, epochs, batch_size, learning_rate, seed, pretrained, weights, compile_model, threshold_rule,
              tta)
    # the world size is not part of the identity: a run's batches and updates do not depend on it
    # (distributed.py), so a task preempted at one size resumes at another
    states = resume.state_store(dataset_uri, {
        "backbone": backbone, "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
        "seed": seed, "pretrained": pretrained, "weights": weights, "recipe": recipe.record(),
        **devices.identity(device),
    })
    with distributed.joined(device) as world:
        model, fitted = fit(data.train, data.val, recipe, run, device, data.class_names, states, world)
    meta = checkpoint_meta(
        backbone=backbone, classes=data.class_names, image_size=int(data.train.images.shape[-1]), epochs=epochs,
        pretrained=pretrained, dataset_uri=dataset_uri, val_source=data.val_source, recipe=recipe.record(),
        device=str(device), **fitted,
    )
    if world.main:  # the one writer
        save_checkpoint(checkpoint_path, model, **meta)
    return meta
