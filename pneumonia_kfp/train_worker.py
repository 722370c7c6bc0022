"""The entry point of every torchrun process of a distributed train job (pneumonia_kfp.jobs):
``python -m pneumonia_kfp.train_worker --dataset URI --backbone NAME --output URI --params JSON``.

Each process runs the library's train() -- the same function the one-GPU KFP train component runs --
which joins torchrun's process group (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR) and trains with DDP,
its shard of the data on its own device (pneumonia_kfp.distributed). Rank 0 then exports the model and
copies the model directory to ``--output`` in the store, with ``job-result.json`` (the model artifact's
metadata) written last: the launcher takes the model only when that file is there. A one-node train task
with several GPUs (or run-local --ranks) runs the same entry point through distributed.run_ranks, its
``--output`` a file:// URI of the task's model directory.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

# the model artifact's metadata, as the one-GPU train component records it
MODEL_METADATA = ("backbone", "best_epoch", "threshold", "threshold_rule", "image_size", "epochs", "pretrained",
                  "seconds", "images_per_second")


def upload(directory: Path, output: str, metadata: dict) -> None:
    from pneumonia_kfp.distributed import RESULT
    from pneumonia_kfp.storage import open_store

    store = open_store(output)
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        store.put_file(path.relative_to(directory).as_posix(), path)
    store.put_bytes(RESULT, json.dumps(metadata, sort_keys=True).encode())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pneumonia_kfp.train_worker")
    p.add_argument("--dataset", required=True, help="the ingested dataset version's URI")
    p.add_argument("--backbone", required=True)
    p.add_argument("--output", required=True, help="store URI that receives rank 0's model directory")
    p.add_argument("--params", default="{}", help="train()'s keyword arguments as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {os.environ.get('RANK', '0')} "
                        "%(levelname)s %(message)s")
    from pneumonia_kfp.distributed import RANK_ERRORS_ENV
    from pneumonia_kfp.errors import PneumoniaKfpError
    from pneumonia_kfp.export import CHECKPOINT, export_model
    from pneumonia_kfp.training import train

    try:
        with tempfile.TemporaryDirectory(prefix="pneumonia-kfp-job-") as tmp:
            meta = train(args.dataset, args.backbone, os.path.join(tmp, CHECKPOINT), **json.loads(args.params))
            if int(os.environ.get("RANK", "0")) == 0:  # one writer of the model
                metadata = {k: meta[k] for k in MODEL_METADATA}
                metadata["formats"] = export_model(tmp)["formats"]
                upload(Path(tmp), args.output, metadata)
    except PneumoniaKfpError as e:
        print(f"train_worker: {e}", file=sys.stderr)
        errors = os.environ.get(RANK_ERRORS_ENV)
        if errors:  # for distributed.run_ranks, which makes it the task's one-line error
            Path(errors, f"rank-{os.environ.get('RANK', '0')}.txt").write_text(str(e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
