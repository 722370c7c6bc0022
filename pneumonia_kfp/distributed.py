"""Data-parallel training of one backbone on several processes (torchrun ranks): DDP inside a train task.

The rule that keeps a run comparable whatever the world size W:

- the global batch is the run's ``batch_size``, split across the ranks; the learning rate and schedule
  (steps per epoch = training images // batch_size) are the one-process ones;
- every rank draws the same epoch order and the same augmentation parameters for the whole global
  batch from one seeded generator, so a sample's augmentation depends on its place in the global
  batch, never on W;
- sample i of the training set lives on rank i % W (``TrainShard``: capacity grows with the ranks);
  a rank trains on the rows of each global batch it holds, so the ranks' shares of one batch differ
  by chance (one may hold none);
- the loss of a rank is its samples' share of the global batch's class-weighted mean (sum over its
  rows / the batch's weight sum, times W, which DDP's gradient average divides out), so the
  all-reduced gradient is the one-process gradient of the same batch;
- BatchNorm statistics are the global batch's: SyncBatchNorm on GPUs (timm's, which keeps its fused
  activations), ``GlooSyncBatchNorm`` on the CPU (torch's has no CPU kernels);
- validation images are split the same way and the probabilities gathered onto every rank, which then
  choose the best epoch and thresholds identically (no broadcast needed); only rank 0 writes.

So the same seed gives the same batches, draws and updates at any W, up to the floating-point order
of the reductions, and a ``last.pt`` (unsharded: the plain module's state) resumes at any W.

A shard larger than the device's data budget (``device_budget``) is streamed from host memory one
batch ahead instead of held on the device: the same rows and draws, so the same result.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumonia_kfp.errors import PneumoniaKfpError

log = logging.getLogger(__name__)
# ranks of each train task (run-local's --ranks); unset: one per GPU the task was given (1 on a CPU)
RANKS_ENV = "PNEUMONIA_KFP_RANKS"
# MiB of training images one rank may hold on its device; more: streamed from host memory. Unset: a
# GPU holds up to DEVICE_DATA_FRACTION of its free memory, the CPU (the images are host memory) all
DEVICE_DATA_BUDGET_ENV = "PNEUMONIA_KFP_DEVICE_DATA_BUDGET_MB"
DEVICE_DATA_FRACTION = 0.5  # the rest: the model, optimizer state and activations
# a folder where each rank that fails writes its one-line error (rank-N.txt), read back by run_ranks
RANK_ERRORS_ENV = "PNEUMONIA_KFP_RANK_ERRORS"
RESULT = "job-result.json"  # what train_worker leaves beside the model it wrote: the model's metadata


class DistributedError(PneumoniaKfpError, RuntimeError):
    """A distributed setting that cannot work, or a rank group that failed."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one writer of checkpoints, last.pt and exports."""
        return self.rank == 0


SOLO = World()


@contextlib.contextmanager
def joined(device):
    """The World torchrun's environment describes (WORLD_SIZE, RANK), its process group open meanwhile:
    NCCL on GPUs, gloo on the CPU. Without torchrun: one process, no group."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        yield SOLO
        return
    import torch.distributed as dist

    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    try:
        yield World(dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()


def task_ranks(environ=os.environ) -> int:
    """How many torchrun ranks this train task runs: RANKS_ENV (run-local's --ranks), else one per GPU the
    task was given (a cluster's train.accelerator_count), else 1."""
    value = environ.get(RANKS_ENV, "")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise DistributedError(f"{RANKS_ENV}={value!r}: expected a number of ranks, 1 or more")
        return int(value)
    import torch

    return max(1, torch.cuda.device_count())


def run_ranks(ranks: int, dataset_uri: str, backbone: str, model_dir: str, params: dict) -> dict:
    """Train with ``ranks`` torchrun processes on this machine (pneumonia_kfp.train_worker, the multi-node
    job's entry point too); rank 0 writes the model directory. Returns the model's artifact metadata."""
    import torch

    if torch.cuda.is_available() and ranks > torch.cuda.device_count():
        raise DistributedError(f"{ranks} ranks but this task sees {torch.cuda.device_count()} GPU(s): each rank "
                               f"needs its own; set {RANKS_ENV} (run-local --ranks) to at most that")
    # the task's share of the cores, split between its ranks (torchrun would give each 1 thread)
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="pneumonia-kfp-ranks-") as errors:
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // ranks)), RANK_ERRORS_ENV: errors}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                   "-m", "pneumonia_kfp.train_worker", "--dataset", dataset_uri, "--backbone", backbone,
                   "--output", Path(model_dir).resolve().as_uri(), "--params", json.dumps(params)]
        code = subprocess.run(command, env=env).returncode
        if code:
            said = sorted(Path(errors).glob("rank-*.txt"))
            why = said[0].read_text().strip() if said else "see each rank's log above"
            raise DistributedError(f"training with {ranks} torchrun ranks failed (exit {code}): {why}")
    result = Path(model_dir) / RESULT
    metadata = json.loads(result.read_text())
    result.unlink()  # the job's hand-over file; the model directory holds what a one-process task writes
    return metadata


def check_batch(batch_size: int, world: World) -> None:
    if batch_size < world.size:
        raise DistributedError(f"batch_size={batch_size} is smaller than the {world.size} ranks: every rank needs "
                               "a share of the global batch; raise batch_size or use fewer ranks")


# --- the model: global-batch BatchNorm, DDP -------------------------------------------------------------

def _cpu_sync_bn_class():
    import torch
    import torch.distributed as dist

    class AllReduce(torch.autograd.Function):
        """Sum over the ranks; its gradient is the ranks' gradients summed (each rank's loss depends on
        every rank's input through the sum)."""

        @staticmethod
        def forward(ctx, x):
            x = x.clone()
            dist.all_reduce(x)
            return x

        @staticmethod
        def backward(ctx, grad):
            grad = grad.clone()
            dist.all_reduce(grad)
            return grad

    all_reduce = AllReduce.apply

    class GlooSyncBatchNorm(torch.nn.BatchNorm2d):
        """BatchNorm2d whose training statistics are the global batch's over all ranks (two-pass: the
        sums and count, then the centred squares, each one differentiable all-reduce), for the CPU where
        torch.nn.SyncBatchNorm has no kernels. Same parameters and buffers as BatchNorm2d."""

        def forward(self, x):
            if not self.training:
                return super().forward(x)
            dims = (0, 2, 3)
            # the count rides with the sums: on a CPU each collective's latency costs more than its bytes
            sums = all_reduce(torch.cat([x.sum(dims), x.new_full((1,), x.numel() / x.shape[1])]))
            n = sums[-1]
            mean = sums[:-1] / n
            centred = x - mean[None, :, None, None]
            var = all_reduce(centred.square().sum(dims)) / n
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp(min=1), m)
            y = centred * (var + self.eps).rsqrt()[None, :, None, None]
            return y * self.weight[None, :, None, None] + self.bias[None, :, None, None]

    return GlooSyncBatchNorm


def sync_batchnorm(model, device):
    """``model`` with global-batch BatchNorm (see the module docstring); parameters are kept, so an
    optimizer made before or after sees the same tensors."""
    import torch
    from timm.layers import convert_sync_batchnorm

    if device.type == "cuda":
        return convert_sync_batchnorm(model)
    gloo_bn = _cpu_sync_bn_class()
    for name, child in list(model.named_children()):
        if type(child) is torch.nn.BatchNorm2d and child.affine and child.track_running_stats:
            new = gloo_bn(child.num_features, child.eps, child.momentum).to(child.weight.device)
            new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            setattr(model, name, new)
        elif isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            log.warning("%s (%s) keeps per-rank batch statistics on the CPU", name, type(child).__name__)
        else:
            sync_batchnorm(child, device)
    return model


def data_parallel(model, device, world: World):
    """The module the optimisation steps run: DDP (gradients all-reduced, averaged) with several ranks."""
    if world.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class GlobalBatchLoss:
    """The class-weighted cross-entropy mean of the global batch, as this rank's share (module docstring)."""

    def __init__(self, criterion, world: World):
        self.weight, self.label_smoothing, self.world_size = criterion.weight, criterion.label_smoothing, world.size

    def of_batch(self, batch_labels):
        """The loss function of one step, given the labels of the whole global batch."""
        import torch.nn.functional as F

        scale = self.world_size / self.weight[batch_labels].sum()

        def loss(logits, y):
            return F.cross_entropy(logits, y, weight=self.weight, label_smoothing=self.label_smoothing,
                                   reduction="sum") * scale
        return loss


# --- the data: this rank's shard, resident or streamed ---------------------------------------------------

def device_budget(device, environ=os.environ) -> float:
    """Bytes of training images one rank may keep on ``device`` (DEVICE_DATA_BUDGET_ENV, else the default)."""
    value = environ.get(DEVICE_DATA_BUDGET_ENV, "")
    if value:
        try:
            mb = float(value)
        except ValueError:
            mb = -1
        if mb < 0:
            raise DistributedError(f"{DEVICE_DATA_BUDGET_ENV}={value!r}: expected MiB, a number >= 0")
        return mb * 2 ** 20
    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0] * DEVICE_DATA_FRACTION
    return float("inf")


@dataclass(frozen=True)
class Step:
    """One step's global batch and this rank's part of it."""
    batch_labels: object  # labels of the whole global batch (the loss's weight sum)
    labels: object  # this rank's rows' labels
    positions: object  # their places in the global batch (which augmentation draws are theirs); None: all
    images: object  # their uint8 images on the device (with ``rows``: the set they are rows of)
    count: int  # images in the global batch
    rows: object = None  # one rank, the set on the device: the batch's rows, gathered by the augmentation


class TrainShard:
    """This rank's training images (sample i on rank i % W) on the device, or in host memory when they
    exceed ``budget`` bytes; every label on the device (the global batches' loss weights)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, world: World, device, budget: float):
        import torch

        self.world, self.device, self.count = world, device, len(labels)
        self.labels = torch.from_numpy(labels).to(device)
        mine = images if world.size == 1 else np.ascontiguousarray(images[world.rank::world.size])
        self.streamed = mine.nbytes > budget
        if self.streamed:
            log.warning("rank %d: its %.0f MiB of training images exceed the device data budget of %.0f MiB "
                        "(%s): streaming batches from host memory", world.rank, mine.nbytes / 2 ** 20,
                        budget / 2 ** 20, DEVICE_DATA_BUDGET_ENV)
            self.images = torch.from_numpy(mine)
        else:
            from pneumonia_kfp.device import to_device

            self.images = to_device(mine, device)

    def epoch(self, order, batch_size: int, steps: int):
        """The epoch's ``Step``s for ``order`` (the global permutation; one read-back per epoch)."""
        w, rank = self.world.size, self.world.rank
        if w == 1 and not self.streamed:  # every row here: index on the device, nothing read back
            for step in range(steps):
                batch = order[step * batch_size:(step + 1) * batch_size]
                yield Step(self.labels[batch], self.labels[batch], None, self.images, len(batch), rows=batch)
            return
        host_order = order.cpu().numpy()
        plan = []
        for step in range(steps):
            batch = host_order[step * batch_size:(step + 1) * batch_size]
            positions = np.flatnonzero(batch % w == rank)
            plan.append((step, batch[positions], positions))
        rows = (self._streamed_rows([mine // w for _, mine, _ in plan]) if self.streamed
                else (self.images[self._to_device(mine // w)] for _, mine, _ in plan))
        for (step, mine, positions), images in zip(plan, rows, strict=True):
            batch = order[step * batch_size:(step + 1) * batch_size]
            yield Step(self.labels[batch], self.labels[self._to_device(mine)], self._to_device(positions), images,
                       len(batch))

    def _to_device(self, array: np.ndarray):
        import torch

        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def _streamed_rows(self, plan: list[np.ndarray]):
        """Each step's rows (``plan``: their rows of the shard) gathered in host memory (pinned when CUDA)
        and sent, the next one prepared by a worker thread while this one trains."""
        import torch

        cuda = self.device.type == "cuda"

        def fetch(local):
            rows = self.images[torch.from_numpy(local)]
            return rows.pin_memory().to(self.device, non_blocking=True) if cuda else rows

        with ThreadPoolExecutor(1, thread_name_prefix="batch-prefetch") as pool:
            ahead = pool.submit(fetch, plan[0]) if plan else None
            for i in range(len(plan)):
                rows = ahead.result()
                if i + 1 < len(plan):
                    ahead = pool.submit(fetch, plan[i + 1])
                yield rows


def batch_of(step: Step, generator, mean: float, std: float, policy):
    """This rank's augmented, normalised float rows of the step: the global batch's augmentation
    parameters drawn (the same on every rank, the same at any W), this rank's taken. ``policy``: a name
    in augmentation.POLICIES, or a Policy."""

    from pneumonia_kfp.augmentation import POLICIES, apply, draw, normalize
    from pneumonia_kfp.inference import device_layout

    chosen = POLICIES[policy] if isinstance(policy, str) else policy
    images = step.images
    if chosen is None:
        x = normalize(images if step.rows is None else images[step.rows], mean, std)
    else:
        params = draw(chosen, step.count, images, generator)
        params = params if step.positions is None else params[step.positions]
        # an empty share gives an empty batch; rows: on a CPU each of apply's threads gathers its own
        x = apply(images, params, normalize_to=(mean, std), rows=step.rows)
    return device_layout(x, x.device)


# --- validation: every rank predicts its part, all get the whole ------------------------------------------

def predict_all(model, images: np.ndarray, mean: float, std: float, tta: bool, world: World) -> np.ndarray:
    """P(positive) of every image: rank r predicts images r, r + W, ...; the parts gathered onto every rank."""
    from pneumonia_kfp.inference import predict

    if world.size == 1:
        return predict(model, images, mean, std, tta=tta)
    import torch.distributed as dist

    parts = [None] * world.size
    dist.all_gather_object(parts, predict(model, np.ascontiguousarray(images[world.rank::world.size]), mean, std,
                                                  tta=tta))
    prob = np.empty(len(images), dtype=parts[0].dtype)
    for rank, part in enumerate(parts):
        prob[rank::world.size] = part
    return prob
