"""The GPU code paths, checked on the CPU: device selection (no silent CPU fallback, the task's own GPU,
the deterministic switch), the autocast dtype and what of it a resumable state depends on, no
read-back from the device in a training step, and inference that fits any image size."""
import collections

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pneumonia_kfp import device as devices
from pneumonia_kfp.device import DETERMINISTIC_ENV, REQUIRE_GPU_ENV, DeviceError, select_device

OLD_DRIVER = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
              "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
OPEN_DRIVER = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
               "(dvs-builder@U16-I3-B03-4-3)  Sun Jul 27 06:54:38 UTC 2025\n")


@pytest.fixture(autouse=True)
def restore_backend():
    """select_device sets process-wide flags: leave them as they were for the tests that follow."""
    saved = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.benchmark = saved[1]


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fake_gpu(monkeypatch):
    """CUDA "available" with GPU 1 current; set_device records its argument."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


@pytest.mark.parametrize("env", [{"NVIDIA_VISIBLE_DEVICES": "0"}, {"NVIDIA_VISIBLE_DEVICES": "GPU-3f2a,GPU-77c1"},
                                 {"NVIDIA_VISIBLE_DEVICES": "all"}, {REQUIRE_GPU_ENV: "1"}])
def test_a_task_given_a_gpu_that_cuda_cannot_use_fails_naming_the_driver(env, no_cuda, tmp_path):
    version = tmp_path / "version"
    version.write_text(OLD_DRIVER)
    with pytest.raises(DeviceError) as e:
        select_device(env, version)
    message = str(e.value)
    assert "\n" not in message and "given a GPU but CUDA is unusable" in message
    assert "NVIDIA driver 535.104.05 found" in message
    assert f"CUDA {torch.version.cuda}" in message and "needs driver >= 580 for CUDA 13.x" in message


def test_without_a_driver_the_message_says_so(no_cuda, tmp_path):
    missing = tmp_path / "nvidia" / "version"
    with pytest.raises(DeviceError, match=f"no NVIDIA driver found \\({missing} missing\\)"):
        select_device({"NVIDIA_VISIBLE_DEVICES": "0"}, missing)


@pytest.mark.parametrize("text, version", [(OLD_DRIVER, "535.104.05"), (OPEN_DRIVER, "580.65.06"),
                                           ("something else\n", "unknown")])
def test_the_driver_version_is_read_from_the_kernel_modules_file(text, version, tmp_path):
    (tmp_path / "version").write_text(text)
    assert devices.driver_version(tmp_path / "version") == version


@pytest.mark.parametrize("env", [{}, {"NVIDIA_VISIBLE_DEVICES": ""}, {"NVIDIA_VISIBLE_DEVICES": "void"},
                                 {"NVIDIA_VISIBLE_DEVICES": "none"}, {"NVIDIA_VISIBLE_DEVICES": " None "},
                                 {REQUIRE_GPU_ENV: "0"}])
def test_a_task_given_no_gpu_computes_on_the_cpu(env, no_cuda, tmp_path):
    assert select_device(env, tmp_path / "missing") == torch.device("cpu")
    assert torch.backends.cudnn.benchmark is False


def test_train_fails_before_it_reads_any_data(no_cuda, monkeypatch, tmp_path):
    from pneumonia_kfp.training import train

    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "0")
    with pytest.raises(DeviceError):  # not the DataError of the missing dataset
        train((tmp_path / "nothing" / "datasets" / "abc").as_uri(), "resnet18", str(tmp_path / "m.pt"))


@pytest.mark.parametrize("env, index", [({}, 1), ({"LOCAL_RANK": "3"}, 3)])
def test_the_gpu_is_the_ranks_or_the_current_one_never_a_bare_cuda(env, index, fake_gpu):
    device = select_device(env)
    assert device == torch.device("cuda", index) and fake_gpu == [device]  # made current too
    assert torch.backends.cudnn.benchmark is True


@pytest.mark.parametrize("env, expected", [({DETERMINISTIC_ENV: "1"}, True), ({DETERMINISTIC_ENV: "0"}, False),
                                           ({}, False)])
def test_the_deterministic_switch(env, expected, fake_gpu):
    environ = dict(env)
    select_device(environ)
    assert torch.are_deterministic_algorithms_enabled() is expected
    assert torch.backends.cudnn.benchmark is not expected  # autotuning off only when deterministic
    assert ("CUBLAS_WORKSPACE_CONFIG" in environ) is expected


def fake_bf16(monkeypatch, native: bool):
    """torch.cuda.is_bf16_supported of a GPU with native bf16 (A100, H100) or only emulated (V100, T4)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)


@pytest.mark.parametrize("native, dtype", [(True, torch.bfloat16), (False, torch.float16)])
def test_bf16_only_on_gpus_with_native_bf16(native, dtype, monkeypatch):
    fake_bf16(monkeypatch, native)
    assert devices.amp_dtype(torch.device("cuda", 0)) == dtype
    assert devices.amp_dtype(torch.device("cpu")) is None


def test_the_resume_identity_names_device_type_autocast_and_determinism(monkeypatch):
    def identity(device, native=True, deterministic=""):
        fake_bf16(monkeypatch, native)
        monkeypatch.setenv(DETERMINISTIC_ENV, deterministic)
        return devices.identity(torch.device(device))

    cases = [identity("cpu"), identity("cuda"), identity("cuda", native=False), identity("cuda", deterministic="1"),
             identity("cpu", deterministic="1")]
    assert cases[0] == {"device": "cpu", "autocast": "None", "deterministic": False}
    assert len({tuple(sorted(c.items())) for c in cases}) == len(cases)
    assert identity("cuda:1") == cases[1]  # which GPU does not matter


class HostReads(TorchDispatchMode):
    """Counts what would make the host wait for a GPU: reading a value back (.item(), if tensor:) and
    copying between devices."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.counts["read back"] += 1
        target = kwargs.get("device")
        if func is torch.ops.aten._to_copy.default and target is not None and torch.device(target) != args[0].device:
            self.counts["copy"] += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("policy", ["default", "seed"])
def test_a_training_epoch_reads_back_once_however_many_steps(policy, monkeypatch):
    """fp16 autocast with its grad scaler (the V100/T4 path) run on the CPU: the epoch's loss is read
    once at its end; no step reads anything back (a GPU would make the host wait every step)."""
    from pneumonia_kfp.distributed import SOLO, GlobalBatchLoss, TrainShard
    from pneumonia_kfp.training import EpochPlan, Recipe, build_state, run_epoch

    monkeypatch.setattr(devices, "amp_dtype", lambda device: torch.float16)
    cpu = torch.device("cpu")
    state = build_state("test_resnet", cpu, 6, 1, 1e-3, 0, Recipe(augmentation=policy), False, "")
    assert state.scaler.is_enabled()
    images = torch.randint(0, 256, (24, 1, 32, 32), dtype=torch.uint8)
    data = TrainShard(images.numpy(), (torch.arange(24) % 2).numpy(), SOLO, cpu, float("inf"))
    plan = EpochPlan("t", 1, data, 4, 0.5, 0.25, policy,
                     GlobalBatchLoss(torch.nn.CrossEntropyLoss(weight=torch.ones(2)), SOLO), state.model)
    with HostReads() as reads:
        row = run_epoch(state, plan)
    assert row["images"] == 24 and reads.counts == {"read back": 1}


def test_augmentation_on_another_device_reads_nothing_back_to_the_host():
    """On another device (meta: shapes only) a batch is made there: nothing is read back to the host."""
    from pneumonia_kfp.augmentation import DEFAULT_POLICY, augment

    images = torch.zeros(4, 1, 32, 32, dtype=torch.uint8, device="meta")
    augment(images, None, DEFAULT_POLICY)
    with HostReads() as reads:
        out = augment(images, None, DEFAULT_POLICY)
    assert out.device.type == "meta" and reads.counts == {}


def test_the_training_set_goes_to_the_device_without_pinned_memory(monkeypatch):
    """A pinned copy of the whole set would stay in torch's pinned-memory cache for the whole run."""
    from pneumonia_kfp.device import to_device

    moved = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pytest.fail("pinned"))
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device, **kw: moved.append(device) or self)
    array = np.arange(6, dtype=np.uint8)
    assert to_device(array, torch.device("cuda", 0)).tolist() == list(range(6)) and moved == [torch.device("cuda", 0)]


class Recorder(torch.nn.Module):
    """A 2-class model that records the batches it is given."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.batches = []

    def forward(self, x):
        self.batches.append((len(x), x.dtype, torch.is_autocast_enabled(x.device.type)))
        m = x.mean(dim=(1, 2, 3)) * self.w
        return torch.stack([-m, m], 1)


@pytest.mark.parametrize("tta", [False, True])
def test_inference_batches_hold_a_fixed_number_of_pixels(tta, monkeypatch):
    from pneumonia_kfp import augmentation, inference

    monkeypatch.setattr(inference, "PREDICT_PIXELS", 3 * 64 * 64)
    viewed = []
    view = augmentation.tta_view
    monkeypatch.setattr(augmentation, "tta_view", lambda x, v: viewed.append(len(x)) or view(x, v))
    model = Recorder()
    images = np.random.default_rng(0).integers(0, 256, (7, 1, 64, 64), dtype=np.uint8)
    prob = inference.predict(model, images, 0.5, 0.25, tta=tta)
    views = len(augmentation.TTA_VIEWS) if tta else 1
    assert prob.shape == (7,) and [b[0] for b in model.batches] == [n for n in (3, 3, 1) for _ in range(views)]
    assert viewed == ([n for n in (3, 3, 1) for _ in range(views)] if tta else [])  # views made per batch
    assert {b[1:] for b in model.batches} == {(torch.float32, False)}  # fp32, no autocast
    small = Recorder()  # a quarter of the pixels per image: four times the images per batch
    inference.predict(small, images[:, :, :32, :32], 0.5, 0.25)
    assert [b[0] for b in small.batches] == [7]
