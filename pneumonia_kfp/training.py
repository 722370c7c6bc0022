"""train: one backbone on a stored dataset; best epoch and threshold chosen on validation."""

import copy
import logging
import time

import numpy as np

from pneumonia_kfp import resume
from pneumonia_kfp.data import DataError, StoredDataset, grouped_holdout, groups_of
from pneumonia_kfp.params import check_run_params, default

log = logging.getLogger(__name__)
MIN_VAL_IMAGES = 100
VAL_FRACTION = 0.1


def train_val_split(ds: StoredDataset, seed: int):
    """(train images, labels), (val images, labels), and how val was made.

    The dataset's own val split when it has at least MIN_VAL_IMAGES; otherwise train and that
    small val are pooled and a patient-grouped, class-stratified val is carved from the pool.
    """
    tx, ty, te = ds.split("train")
    vx, vy, ve = ds.split("val")
    if len(vy) >= MIN_VAL_IMAGES:
        return (tx, ty), (vx, vy), "dataset val split"
    if len(vy):
        tx, ty, te = np.concatenate([tx, vx]), np.concatenate([ty, vy]), te + ve
    held = grouped_holdout(ty, groups_of(te), VAL_FRACTION, seed)
    how = f"carved from train: {held.sum()} images, grouped by patient (dataset val had {len(vy)} < {MIN_VAL_IMAGES})"
    log.warning("validation set %s", how)
    return (tx[~held], ty[~held]), (tx[held], ty[held]), how


def to_device(array, device):
    """numpy -> tensor on ``device``; on CUDA through pinned memory, without blocking the host."""
    import torch

    t = torch.from_numpy(array)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def training_batch(images, idx, generator, mean: float, std: float):
    """Augmented, normalised float batch from the device-resident uint8 images (no host round trip)."""
    import torch

    from pneumonia_kfp.augmentation import augment, normalize

    x = normalize(augment(images[idx], generator), mean, std)
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


def training_step(model, x, y, loss_fn, optimizer, scaler):
    """One optimisation step under autocast; returns the detached loss (no device sync)."""
    from pneumonia_kfp.backbones import device_autocast

    with device_autocast(x.device):
        loss = loss_fn(model(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def train(
    dataset_uri: str, backbone: str, checkpoint_path: str, epochs: int = default("epochs"),
    batch_size: int = default("batch_size"), learning_rate: float = default("learning_rate"),
    seed: int = default("seed"),
    pretrained: bool = False, weights: str = "", compile_model: bool = False,
) -> dict:
    """Train, keep the epoch with the best validation AUC, pick the threshold on validation.

    Writes the checkpoint to ``checkpoint_path`` and returns its metadata (history, timings,
    validation metrics at the chosen threshold).
    """
    import torch

    from pneumonia_kfp.backbones import create_backbone, grayscale_normalization, predict, save_checkpoint
    from pneumonia_kfp.metrics import choose_threshold, classification_report
    from pneumonia_kfp.telemetry import TrainTelemetry, progress

    check_run_params({"backbones": [backbone], "epochs": epochs, "batch_size": batch_size,
                      "learning_rate": learning_rate, "seed": seed})
    torch.manual_seed(seed)
    ds = StoredDataset(dataset_uri)
    if len(ds.classes) != 2:
        raise DataError(f"{dataset_uri} has classes {ds.classes}: this pipeline classifies exactly 2")
    (tx, ty), (vx, vy), val_source = train_val_split(ds, seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    model = create_backbone(backbone, num_classes=2, pretrained=pretrained, weights=weights).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    mean, std = grayscale_normalization(model)
    # the whole uint8 training set lives on the device; batches are indexed there
    images, labels = to_device(tx, device), to_device(ty, device)
    counts = torch.bincount(labels, minlength=2).float()
    class_weight = counts.sum() / (2 * counts.clamp(min=1))  # balanced: rare class weighs more
    loss_fn = torch.nn.CrossEntropyLoss(weight=class_weight)

    steps = max(1, len(images) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=epochs * steps)
    use_scaler = device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    generator = torch.Generator(device=device).manual_seed(seed)
    step_model = torch.compile(model) if compile_model else model

    history, best, train_seconds, first_epoch = [], None, 0.0, 1
    states = resume.state_store(dataset_uri, {
        "backbone": backbone, "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
        "seed": seed, "pretrained": pretrained, "weights": weights,
    })
    saved = resume.load(states, device)
    if saved:  # a restarted task (preempted pod, retry): carry on after the last finished epoch
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        generator.set_state(saved["generator"].cpu())  # RNG states live on the CPU whatever the device
        torch.set_rng_state(saved["cpu_rng"].cpu())
        history, best, train_seconds = saved["history"], saved["best"], saved["train_seconds"]
        first_epoch = saved["epoch"] + 1
        log.warning("%s: resuming after epoch %d from %s", backbone, saved["epoch"], states.uri_of("last.pt"))
    # Prometheus pushgateway, when configured; a resumed run's earlier epochs count too
    telemetry = TrainTelemetry(backbone, epochs, history=history, samples_per_epoch=steps * batch_size)
    for epoch in range(first_epoch, epochs + 1):
        model.train()
        start, total_loss = time.perf_counter(), torch.zeros((), device=device)
        order = torch.randperm(len(images), device=device, generator=generator)
        for step in progress(range(steps), desc=f"{backbone} epoch {epoch}/{epochs}", unit="batch"):
            idx = order[step * batch_size:(step + 1) * batch_size]
            x = training_batch(images, idx, generator, mean, std)
            total_loss += training_step(step_model, x, labels[idx], loss_fn, optimizer, scaler)
            scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        train_seconds += seconds

        prob = predict(model, vx, mean, std)
        val_loss = float(torch.nn.functional.binary_cross_entropy(
            torch.from_numpy(prob).double().clamp(1e-7, 1 - 1e-7), torch.from_numpy(vy).double()))
        val_auc = classification_report(vy, prob, 0.5, ds.classes)["auc"]
        row = {"epoch": epoch, "train_loss": total_loss.item() / steps, "val_loss": val_loss, "val_auc": val_auc,
               "seconds": seconds, "images_per_second": steps * batch_size / seconds}
        history.append(row)
        telemetry.epoch_done(row, samples=steps * batch_size)
        if best is None or (val_auc, -val_loss) > (best["val_auc"], -best["val_loss"]):
            best = {**row, "state": copy.deepcopy(model.state_dict()), "prob": torch.from_numpy(prob)}
        resume.save(states, {
            "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "generator": generator.get_state(),
            "cpu_rng": torch.get_rng_state(), "history": history, "best": best, "train_seconds": train_seconds,
        })
        log.info("%s epoch %d/%d  loss %.4f  val_loss %.4f  val_auc %.4f  %.0f img/s", backbone, epoch,
                 epochs, row["train_loss"], val_loss, val_auc, row["images_per_second"])

    model.load_state_dict(best["state"])
    best_prob = best["prob"].cpu().numpy()
    threshold = choose_threshold(vy, best_prob)
    meta = {
        "backbone": backbone, "classes": ds.classes, "image_size": int(tx.shape[-1]),
        "mean": mean, "std": std, "epochs": epochs, "best_epoch": best["epoch"], "threshold": threshold,
        "pretrained": pretrained, "dataset_uri": dataset_uri, "val_source": val_source,
        "seconds": train_seconds, "images_per_second": epochs * steps * batch_size / train_seconds,
        "history": history, "val": classification_report(vy, best_prob, threshold, ds.classes, ci_seed=seed),
        "device": str(device),
    }
    save_checkpoint(checkpoint_path, model, **meta)
    telemetry.done()
    return meta
