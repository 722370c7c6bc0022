"""Images/s of predict's engines on the CPU: ONNX Runtime (model.onnx, predict's default) against torch
eager (checkpoint.pt through timm, the baseline), at batch sizes 1 and 32, in the same run on the same
random uint8 images. Decoding is not timed (it is the same for every engine).

    .venv/bin/python benchmarks/predict_throughput.py --model out/models/resnet18

Last line: {"image_size", "threads", "results": [{"batch", "<engine>_img_s", ...,
"<engine>_vs_eager"}, ...]}.
"""
import argparse
import json
import time

import numpy as np

BASELINE = "checkpoint"  # torch eager


def images_per_s(run, x: np.ndarray, seconds: float) -> float:
    for _ in range(3):  # warm-up: first-call allocations, kernel choices, thread pools
        run(x)
    start, done = time.perf_counter(), 0
    while done == 0 or time.perf_counter() - start < seconds:
        run(x)
        done += len(x)
    return done / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a model directory with model.onnx and checkpoint.pt "
                    "(OUT/models/<backbone> of run-local)")
    ap.add_argument("--batch-sizes", default="1,32", help="comma-separated (default: 1,32)")
    ap.add_argument("--engines", default="onnx,checkpoint", help="predict's engines to time; checkpoint (torch "
                    "eager) is the baseline (default: onnx,checkpoint)")
    ap.add_argument("--seconds", type=float, default=5.0, help="timed per engine and batch size (default: 5)")
    args = ap.parse_args()

    import torch

    from pneumonia_kfp.predict import load_model

    engines = [e.strip() for e in args.engines.split(",")]
    engines = [BASELINE] + [e for e in engines if e != BASELINE]
    models = {e: load_model(args.model, e) for e in engines}
    assert all(m.engine == e for e, m in models.items()), "an engine fell back to another form"
    size = models[BASELINE].image_size
    rng = np.random.default_rng(0)
    results = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        x = rng.integers(0, 256, (batch, 1, size, size), dtype=np.uint8)
        row = {"batch": batch}
        for e in engines:
            row[f"{e}_img_s"] = round(images_per_s(models[e].run, x, args.seconds), 1)
        for e in engines[1:]:
            row[f"{e}_vs_eager"] = round(row[f"{e}_img_s"] / row[f"{BASELINE}_img_s"], 2)
        results.append(row)
        print(row, flush=True)
    print(json.dumps({"backbone": models[BASELINE].backbone, "image_size": size,
                      "torch_threads": torch.get_num_threads(), "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
