"""Data-parallel scaling of training: images/s of 1 and N torchrun ranks, and the fraction of linear.

Each rank runs training's own epoch loop (training.run_epoch: its shard, the global batch's draws,
DDP's all-reduce, global-batch BatchNorm) on random uint8 images; the global batch is --batch-size
at every world size, as in a real run. The ranks share the machine's cores (--threads in all, split
between them), so on a CPU this measures what splitting the same cores across processes costs or
gains; on GPUs give each rank its own GPU (--threads per rank is then irrelevant). The machine may be
shared and noisy: each world size runs --repeats times and the median is reported.
Prints one JSON line: {"ranks": [1, N], "img_s": [...], "speedup", "fraction_of_linear", "runs"}.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys


def worker(a) -> None:
    """One rank: two epochs of training's loop (the first warms up), rank 0 prints the second's images/s."""
    import numpy as np

    from pneumonia_kfp import distributed
    from pneumonia_kfp.backbones import grayscale_normalization
    from pneumonia_kfp.device import select_device
    from pneumonia_kfp.training import EpochPlan, Recipe, balanced_loss, build_state, run_epoch

    device = select_device()
    with distributed.joined(device) as world:
        rng = np.random.default_rng(0)
        count = a.batch_size * a.steps
        images = rng.integers(0, 256, (count, 1, a.image_size, a.image_size), dtype=np.uint8)
        labels = (np.arange(count) % 2).astype(np.int64)
        data = distributed.TrainShard(images, labels, world, device, distributed.device_budget(device))
        state = build_state(a.backbone, device, a.steps, 2, 1e-3, 0, Recipe(ema=False), False, "", world)
        mean, std = grayscale_normalization(state.model)
        plan = EpochPlan(a.backbone, 2, data, a.batch_size, mean, std, "default",
                         distributed.GlobalBatchLoss(balanced_loss(data.labels, 0.0), world),
                         distributed.data_parallel(state.model, device, world))
        run_epoch(state, plan)
        state.epoch += 1
        row = run_epoch(state, plan)
        if world.main:
            print(json.dumps({"world_size": world.size, "img_s": row["images_per_second"]}), flush=True)


def measure(a, ranks: int) -> float:
    threads = max(1, a.threads // ranks)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               __file__, "--worker", *sys.argv[1:]]
    done = subprocess.run(command, capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])["img_s"]


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="the global batch, split across the ranks")
    p.add_argument("--steps", type=int, default=8, help="steps per timed epoch")
    p.add_argument("--ranks", type=int, default=2, help="the world size compared with 1")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads in all, split between ranks")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    runs = {n: [] for n in (1, a.ranks)}
    for _ in range(a.repeats):  # alternate, so a burst of load elsewhere hits both sides alike
        for n in runs:
            runs[n].append(round(measure(a, n), 1))
    one, many = (statistics.median(runs[n]) for n in runs)
    print(json.dumps({"benchmark": "ddp_scaling", "backbone": a.backbone, "image_size": a.image_size,
                      "batch_size": a.batch_size, "threads": a.threads, "ranks": list(runs), "img_s": [one, many],
                      "speedup": round(many / one, 3), "fraction_of_linear": round(many / one / a.ranks, 3),
                      "runs": {str(n): r for n, r in runs.items()}}))


if __name__ == "__main__":
    main()
