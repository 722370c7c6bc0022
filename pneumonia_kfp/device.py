"""The device a train or evaluate task computes on, its autocast dtype, and the deterministic switch.

``select_device`` is the one place that picks it: the task's own GPU when CUDA works, the CPU when the
task was given no GPU, and an error when it was given one that CUDA cannot use (a node driver too old
for torch's CUDA build would otherwise mean hours of silent training on the CPU).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from pneumonia_kfp.errors import PneumoniaKfpError

# "1": this task was given a GPU (set by the pipeline on train tasks with accelerators, and by run-local's --gpus)
REQUIRE_GPU_ENV = "PNEUMONIA_KFP_REQUIRE_GPU"
# "1": deterministic algorithms only, so a resumed GPU run ends like an uninterrupted one (slower)
DETERMINISTIC_ENV = "PNEUMONIA_KFP_DETERMINISTIC"
DRIVER_VERSION_FILE = "/proc/driver/nvidia/version"
MIN_DRIVER = 580  # the oldest NVIDIA driver for CUDA 13.x, the CUDA of the locked torch build


class DeviceError(PneumoniaKfpError, RuntimeError):
    """The task was given a GPU that CUDA cannot use."""


def given_gpu(environ=os.environ) -> bool:
    """Whether this task was given a GPU: the NVIDIA device plugin and container runtime (a cluster's
    GPU request, ``docker run --gpus``) name its devices in NVIDIA_VISIBLE_DEVICES; or REQUIRE_GPU_ENV."""
    visible = environ.get("NVIDIA_VISIBLE_DEVICES", "").strip().lower()
    return environ.get(REQUIRE_GPU_ENV, "") == "1" or visible not in ("", "void", "none")


def driver_version(path: str | Path = DRIVER_VERSION_FILE) -> str | None:
    """The loaded NVIDIA kernel module's version (e.g. "575.57.08"), read without nvidia-smi; None without one."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    found = re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\s", text)
    return found.group(1) if found else "unknown"


def unusable_gpu_message(driver_file: str | Path = DRIVER_VERSION_FILE) -> str:
    import torch

    found = driver_version(driver_file)
    driver = (f"no NVIDIA driver found ({driver_file} missing)" if found is None
              else f"NVIDIA driver {found} found")
    return (f"this task was given a GPU but CUDA is unusable: {driver}; torch {torch.__version__} is built for "
            f"CUDA {torch.version.cuda} and needs driver >= {MIN_DRIVER} for CUDA 13.x. Update the node's driver, "
            "or train on the CPU (train.accelerator_count=0, or run-local without --gpus)")


def select_device(environ=os.environ, driver_file: str | Path = DRIVER_VERSION_FILE):
    """This task's device, its backend set up (cudnn autotuning, or the deterministic mode).

    The GPU is LOCAL_RANK's under torchrun, else the current one (in a container, the task's own GPU
    is cuda:0). A task given a GPU never falls back to the CPU: DeviceError instead.
    """
    import torch

    if torch.cuda.is_available():
        device = torch.device("cuda", int(environ.get("LOCAL_RANK", torch.cuda.current_device())))
        torch.cuda.set_device(device)  # bare "cuda" (synchronize, new tensors) means this GPU too
    elif given_gpu(environ):
        raise DeviceError(unusable_gpu_message(driver_file))
    else:
        device = torch.device("cpu")
    exact = deterministic(environ)
    if exact:
        environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic workspace
    torch.use_deterministic_algorithms(exact)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not exact  # autotuning may pick other kernels
    return device


def deterministic(environ=os.environ) -> bool:
    return environ.get(DETERMINISTIC_ENV, "") == "1"


def amp_dtype(device):
    """Training's autocast dtype: bf16 on GPUs with native bf16 (compute capability 8.0+), fp16 (with a
    grad scaler) on older ones, where bf16 is only emulated and slow; None (fp32) on the CPU."""
    import torch

    if device.type != "cuda":
        return None
    # it asks the current device, which select_device made this one
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast(device):
    """Training's autocast context for ``device`` (none on the CPU)."""
    import contextlib

    import torch

    dtype = amp_dtype(device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def identity(device) -> dict:
    """What of the device a saved training state depends on: a state from another device type, autocast
    dtype (scaler on or off) or determinism cannot be resumed here."""
    return {"device": device.type, "autocast": str(amp_dtype(device)), "deterministic": deterministic()}


def to_device(array, device):
    """numpy -> tensor on ``device``, one blocking copy. Not through pinned memory: torch's pinned-memory
    cache would keep a pinned copy of the whole training set for the rest of the run."""
    import torch

    return torch.from_numpy(array).to(device)
