"""How long training will take on a machine without CUDA, measured before any task starts.

Each backbone's training step is timed on one small batch (one model in memory at a time) and its
figure printed as soon as it is measured; after a budget of measuring, the rest are extrapolated
from the average of those measured, and it says so.
"""
from __future__ import annotations

import sys
import time

ESTIMATE_BUDGET_S = 60.0  # the CPU estimate measures backbones for this long, then extrapolates


def say(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def step_seconds(name: str, params: dict) -> float:
    """Seconds one training step takes per image on this CPU: the fastest of a few steps on a small batch."""
    import torch

    from pneumonia_kfp.backbones import create_backbone

    model = create_backbone(name, num_classes=2)
    opt = torch.optim.AdamW(model.parameters())
    batch = min(8, params["batch_size"])  # small enough to measure in seconds, big enough to be representative
    x = torch.randn(batch, 1, params["image_size"], params["image_size"])
    y = torch.arange(batch) % 2
    steps = []
    for _ in range(3):  # the first step warms up allocators and kernels; the fastest counts
        start = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        steps.append(time.perf_counter() - start)
    return min(steps[1:]) / batch


def duration(seconds: float) -> str:
    return f"about {seconds / 60:.0f} min" if seconds >= 60 else f"about {seconds:.0f} s"


def cpu_estimate(params: dict, images: int, say=say, budget_s: float = ESTIMATE_BUDGET_S,
                 clock=time.monotonic) -> float | None:
    """On a machine without CUDA, the seconds training ``images`` images for ``params["epochs"]`` epochs will
    take with every backbone; None with CUDA."""
    import torch

    if torch.cuda.is_available():
        return None
    names, work = params["backbones"], images * params["epochs"]
    say(f"No GPU: measuring a training step of each backbone on this CPU (at most {budget_s:.0f} s):\n")
    measured: list[float] = []
    start = clock()
    for i, name in enumerate(names):
        if measured and clock() - start > budget_s:
            average = sum(measured) / len(measured)
            say(f"  the other {len(names) - i} backbone(s): {duration(average * work)} each, not measured (the "
                f"{budget_s:.0f} s for measuring ran out; the average of the {len(measured)} measured)\n")
            return sum(measured) * work + average * work * (len(names) - i)
        measured.append(step_seconds(name, params))
        say(f"  {name}: {duration(measured[-1] * work)}  ({i + 1}/{len(names)})\n")
    return sum(measured) * work  # parallel tasks share the same cores, so the wall time is about the sum
