"""DDP inside a train task (pneumonia_kfp.distributed), on the CPU: two gloo ranks under torchrun train to the
same weights as one process given the same global batch and seed; a group whose rank is SIGKILLed resumes
from last.pt (at another world size) and ends where an uninterrupted run ends; a shard over the device data
budget is streamed from host memory and trains to exactly the resident result.

Tolerance, measured on this machine (test_resnet, 32 px, 48 training images, batch 16, 2 epochs): the two
ranks' weights differ from one process's by at most 6.3e-7 (float reduction order: gloo's sum of two
half-batch gradients, BatchNorm statistics summed across ranks); one process at 2 threads instead of 1
already differs by 2.4e-7. ATOL (1e-5) is 16x the former and 40x the latter, and far below what the bugs it
guards against do (measured the same way): rank-local BatchNorm statistics move the weights by 0.14, each
rank averaging its own loss (the class weights' sum per rank, not per global batch) by 7.8e-4.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ATOL = 1e-5
TRAINER = '''
import glob, os, signal, sys, time
from pneumonia_kfp import training
kill_rank = os.environ.get("TEST_KILL_RANK")
if kill_rank is not None:  # that rank dies by SIGKILL once epoch 1 is saved, as a preempted pod would
    fit_epoch = training.fit_epoch
    def killing(state, plan, val):
        row = fit_epoch(state, plan, val)
        if os.environ.get("RANK") == kill_rank and state.epoch == 1:
            while not glob.glob(os.environ["TEST_STORE"] + "/checkpoints/*/last.pt"):
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        return row
    training.fit_epoch = killing
training.train(sys.argv[1], "test_resnet", sys.argv[2], epochs=2, batch_size=16, learning_rate=1e-3, seed=0,
               pretrained=False)
'''


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A tiny ingested synthetic dataset (48 training, 100 validation images at 32 px) and the trainer script."""
    from pneumonia_kfp.ingest import ingest
    from pneumonia_kfp.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("distributed")
    data = make_synthetic(root / "data", counts={"train": 24, "val": 50, "test": 2}, size=32)
    uri = ingest(str(data), str(root / "store"), image_size=32)["uri"]
    (root / "trainer.py").write_text(TRAINER)
    return root, uri.rsplit("/datasets/", 1)[1]


def train(stored, name: str, ranks: int, **env) -> tuple[int, Path, str]:
    """Train in a fresh copy of the store (its own last.pt): ``ranks`` torchrun ranks, or one plain process."""
    root, version = stored
    store = root / name
    if not store.exists():
        shutil.copytree(root / "store", store)
    checkpoint = root / f"{name}.pt"
    command = [sys.executable, str(root / "trainer.py")]
    if ranks > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    done = subprocess.run(command + [f"{store.as_uri()}/datasets/{version}", str(checkpoint)], capture_output=True,
                          text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1", "TEST_STORE": str(store),
                                                       **env})
    return done.returncode, checkpoint, done.stdout + done.stderr


def weights(checkpoint: Path) -> dict:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def one_process(stored):
    code, checkpoint, log = train(stored, "one", 1)
    assert code == 0, log
    return weights(checkpoint)


def assert_same_training(got: dict, want: dict, atol: float) -> None:
    """Same weights and buffers (within ``atol``), kept epoch, thresholds and validation predictions."""
    assert got["state_dict"].keys() == want["state_dict"].keys()
    worst = max((got["state_dict"][k].double() - want["state_dict"][k].double()).abs().max().item()
                for k in want["state_dict"])
    assert worst <= atol, f"weights differ by {worst}"
    assert got["best_epoch"] == want["best_epoch"] and got["threshold"] == pytest.approx(want["threshold"], abs=1e-6)
    np.testing.assert_allclose(got["val_predictions"]["prob"], want["val_predictions"]["prob"], atol=1e-5)


def test_two_gloo_ranks_train_as_one_process(stored, one_process):
    code, checkpoint, log = train(stored, "two", 2)
    assert code == 0, log
    got = weights(checkpoint)
    assert_same_training(got, one_process, ATOL)
    assert [row["world_size"] for row in got["history"]] == [2, 2]
    assert [row["images"] for row in got["history"]] == [48, 48]  # the global batches: 3 steps of 16


def test_a_group_with_a_killed_rank_resumes_from_last_pt_at_another_world_size(stored, one_process):
    code, checkpoint, log = train(stored, "killed", 2, TEST_KILL_RANK="1")
    assert code != 0 and "SIGKILL" in log and not checkpoint.exists(), log
    code, checkpoint, log = train(stored, "killed", 1)  # the retry: one process this time
    assert code == 0 and "resuming after epoch 1" in log, log
    got = weights(checkpoint)
    assert [row["world_size"] for row in got["history"]] == [2, 1]
    assert_same_training(got, one_process, ATOL)


def test_a_shard_over_the_device_data_budget_streams_to_the_same_result(stored, one_process):
    from pneumonia_kfp.distributed import DEVICE_DATA_BUDGET_ENV

    code, checkpoint, log = train(stored, "streamed", 1, **{DEVICE_DATA_BUDGET_ENV: "0.01"})
    assert code == 0 and "streaming batches from host memory" in log, log
    assert_same_training(weights(checkpoint), one_process, 0.0)  # same rows, same draws: bit for bit


def test_streamed_rows_are_the_resident_rows_in_the_same_order():
    """Two ranks' shards, streamed and resident: every step yields the same rows, labels and places."""
    from pneumonia_kfp.distributed import TrainShard, World

    images = np.arange(20 * 4, dtype=np.uint8).reshape(20, 1, 2, 2)
    labels = np.arange(20) % 2
    order = torch.randperm(20, generator=torch.Generator().manual_seed(1))
    for rank in (0, 1):
        world = World(rank, 2)
        resident = list(TrainShard(images, labels, world, torch.device("cpu"), float("inf")).epoch(order, 8, 2))
        streamed = TrainShard(images, labels, world, torch.device("cpu"), 0)
        assert streamed.streamed
        for a, b in zip(resident, streamed.epoch(order, 8, 2), strict=True):
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
            assert torch.equal(a.positions, b.positions) and a.count == b.count == 8
            # this rank's rows are the global batch's samples i with i % 2 == rank (image i's pixels are 4 i)
            assert torch.equal(a.images[:, 0, 0, 0] // 4 % 2, torch.full((len(a.images),), rank, dtype=torch.uint8))
        assert sum(len(s.images) for s in resident) == int((order[:16] % 2 == rank).sum())


def test_a_bad_device_data_budget_is_one_line():
    from pneumonia_kfp.distributed import DEVICE_DATA_BUDGET_ENV, DistributedError, device_budget

    with pytest.raises(DistributedError, match=f"{DEVICE_DATA_BUDGET_ENV}='lots': expected MiB"):
        device_budget(torch.device("cpu"), {DEVICE_DATA_BUDGET_ENV: "lots"})
    assert device_budget(torch.device("cpu"), {DEVICE_DATA_BUDGET_ENV: "2"}) == 2 * 2 ** 20
    assert device_budget(torch.device("cpu"), {}) == float("inf")


PARAMS = {"epochs": 1, "batch_size": 16, "learning_rate": 1e-3, "seed": 0, "pretrained": False}


def test_a_train_task_with_two_ranks_writes_the_one_process_model_directory(stored, tmp_path, monkeypatch):
    """The train component's torchrun path (run-local --ranks, a task with several GPUs): rank 0's model
    directory holds what a one-process task writes, nothing more, and its metadata comes back."""
    from pneumonia_kfp.distributed import run_ranks

    root, version = stored
    shutil.copytree(root / "store", tmp_path / "store")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    meta = run_ranks(2, f"{(tmp_path / 'store').as_uri()}/datasets/{version}", "test_resnet", str(tmp_path / "model"),
                     PARAMS)
    assert meta["backbone"] == "test_resnet" and set(meta["formats"]) == {"torch.export", "onnx"}
    files = {p.name for p in (tmp_path / "model").iterdir()}
    assert {"checkpoint.pt", "model.onnx", "model.pt2", "metadata.json"} <= files and "job-result.json" not in files
    assert [row["world_size"] for row in weights(tmp_path / "model" / "checkpoint.pt")["history"]] == [2]


def test_a_failing_rank_fails_the_task_in_one_line(stored, tmp_path):
    from pneumonia_kfp.distributed import DistributedError, run_ranks

    root, version = stored
    with pytest.raises(DistributedError, match=r"failed \(exit 1\): batch_size=1 is smaller than the 2 ranks"):
        run_ranks(2, f"{(root / 'store').as_uri()}/datasets/{version}", "test_resnet", str(tmp_path / "model"),
                  {**PARAMS, "batch_size": 1})


def test_ranks_of_a_train_task_and_run_locals_checks(tmp_path):
    from pneumonia_kfp.distributed import RANKS_ENV, DistributedError, task_ranks
    from pneumonia_kfp.errors import UsageError
    from pneumonia_kfp.pipelines.cli import parser
    from pneumonia_kfp.pipelines.local import run_local

    assert task_ranks({RANKS_ENV: "3"}) == 3
    assert task_ranks({}) == max(1, torch.cuda.device_count())  # one per GPU the task sees, else 1
    with pytest.raises(DistributedError, match=f"{RANKS_ENV}='0': expected a number of ranks"):
        task_ranks({RANKS_ENV: "0"})
    with pytest.raises(SystemExit):
        parser().parse_args(["run-local", "--output", str(tmp_path), "--ranks", "0"])
    assert parser().parse_args(["run-local", "--output", str(tmp_path), "--ranks", "2"]).ranks == 2
    with pytest.raises(UsageError, match="--ranks 4 exceeds --batch-size 2"):
        run_local({"backbones": ["resnet18"], "batch_size": 2}, tmp_path / "out", None, True, ranks=4)
    with pytest.raises(UsageError, match="--ranks with --gpus"):
        run_local({"backbones": ["resnet18"], "batch_size": 32}, tmp_path / "out", None, True, gpus="all", ranks=2)
