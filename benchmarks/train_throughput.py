"""Training images/s fed by the project's data path vs synthetic tensors already on the device.

Both run the same model, optimizer and autocast settings for the same number of steps; the
ceiling skips only the data path (indexing the uint8 images, augmentation, normalisation).
Prints one JSON line per backbone: {"backbone", "device", "img_s", "ceiling_img_s", "fraction"}.

``--streamed``: also training's own data path (distributed.TrainShard) with the images on the device
(resident) and streamed from host memory one batch ahead (as when a shard exceeds the device data
budget), and the switch point: how many images of this size one device holds before it streams.
"""
import argparse
import json
import tempfile
import time

import torch


def timed_steps(model, make_batch, steps, loss_fn, optimizer, scaler, device) -> float:
    """Images/s over ``steps`` steps, counting the images each batch really holds."""
    from pneumonia_kfp.training import training_step

    for _ in range(3):  # warm-up (cudnn autotuning, allocator)
        x, y = make_batch()
        training_step(model, x, y, loss_fn, optimizer, scaler)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, seen = time.perf_counter(), 0
    for _ in range(steps):
        x, y = make_batch()
        training_step(model, x, y, loss_fn, optimizer, scaler)
        seen += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main():
    from pneumonia_kfp.backbones import grayscale_normalization
    from pneumonia_kfp.data import StoredDataset
    from pneumonia_kfp.device import select_device, to_device
    from pneumonia_kfp.inference import device_layout
    from pneumonia_kfp.ingest import ingest
    from pneumonia_kfp.training import Recipe, build_state, training_batch

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True, help="ImageFolder (e.g. chest_xray, the Kermany layout)")
    p.add_argument("--backbones", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--streamed", action="store_true", help="also time the data path resident vs streamed from host "
                   "memory, and report the switch point")
    a = p.parse_args()
    device = select_device()
    with tempfile.TemporaryDirectory() as tmp:
        x_all, y_all, _ = StoredDataset(ingest(a.data, tmp, image_size=a.image_size)["uri"]).split("train")
    images, labels = to_device(x_all, device), to_device(y_all, device)
    generator = torch.Generator(device=device).manual_seed(0)
    for name in a.backbones.split(","):
        # training's own model, optimizer and grad scaler (no moving average: not part of a step)
        state = build_state(name, device, 1, 1, 1e-4, 0, Recipe(ema=False), False, "")
        model, optimizer, scaler = state.model, state.optimizer, state.scaler
        run_model = torch.compile(model) if a.compile else model
        mean, std = grayscale_normalization(model)
        loss_fn = torch.nn.CrossEntropyLoss()
        batch = min(a.batch_size, len(images))  # a batch never holds more images than the dataset
        fixed_y = labels[:batch]
        synthetic = device_layout(torch.randn(batch, 1, a.image_size, a.image_size, device=device), device)

        def project_batch(mean=mean, std=std, batch=batch):
            idx = torch.randperm(len(images), device=device, generator=generator)[:batch]
            return training_batch(images, idx, generator, mean, std), labels[idx]

        args = (a.steps, loss_fn, optimizer, scaler, device)
        ceiling = timed_steps(run_model, lambda x=synthetic, y=fixed_y: (x, y), *args)
        real = timed_steps(run_model, project_batch, *args)
        extra = streamed_vs_resident(x_all, y_all, device, batch, mean, std, generator, run_model, args) \
            if a.streamed else {}
        print(json.dumps({"benchmark": "train_throughput", "backbone": name, "device": torch.cuda.get_device_name()
                          if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
                          "image_size": a.image_size, "batch_size": batch, "compile": a.compile,
                          "img_s": round(real, 1), "ceiling_img_s": round(ceiling, 1),
                          "fraction": round(real / ceiling, 3), **extra}))


def streamed_vs_resident(x_all, y_all, device, batch, mean, std, generator, model, args) -> dict:
    """Training's data path (one process) with the images resident on the device and streamed from host
    memory; the switch point is the device data budget over one image's bytes."""
    from pneumonia_kfp.distributed import SOLO, TrainShard, batch_of, device_budget

    def batches(shard):
        while True:
            order = torch.randperm(shard.count, device=device, generator=generator)
            for step in shard.epoch(order, batch, max(1, shard.count // batch)):
                yield batch_of(step, generator, mean, std, "default"), step.labels

    rates = {}
    for kind, budget in (("resident", float("inf")), ("streamed", 0)):
        stream = batches(TrainShard(x_all, y_all, SOLO, device, budget))
        rates[kind] = timed_steps(model, lambda s=stream: next(s), *args)
    switch = device_budget(device) / x_all[0].nbytes
    return {"resident_img_s": round(rates["resident"], 1), "streamed_img_s": round(rates["streamed"], 1),
            "streamed_fraction": round(rates["streamed"] / rates["resident"], 3),
            "image_bytes": int(x_all[0].nbytes), "switch_images": None if switch == float("inf") else int(switch)}


if __name__ == "__main__":
    main()
