"""Images/s of the project's training data path vs a seed-style ImageFolder + PIL + DataLoader.

Project: ingest once (not timed), then uint8 tensors -> augment + normalize (what a training step runs:
training.training_batch, i.e. distributed.batch_of; on a CPU OpenCV image by image from 128 px).
Seed: torchvision ImageFolder decoding every JPEG (to RGB) with PIL each epoch, the seed's
transforms, DataLoader with one worker per core. Same machine, same run, same number of images;
the two alternate ``--repeats`` times (a shared machine's load moves between them).
Last line: {"project_img_s", "seed_img_s", "ratio" (medians over the repeats), "ratios", ...}.
"""
import argparse
import json
import os
import statistics
import tempfile
import time

import torch


def train_images(data: str, size: int) -> torch.Tensor:
    """The train split as training sees it: ingested once (not timed), uint8 N×1×S×S."""
    from pneumonia_kfp.data import StoredDataset
    from pneumonia_kfp.ingest import ingest

    with tempfile.TemporaryDirectory() as tmp:
        return torch.from_numpy(StoredDataset(ingest(data, tmp, image_size=size)["uri"]).split("train")[0])


def project_img_s(images: torch.Tensor, batch: int, n: int) -> float:
    from pneumonia_kfp.training import training_batch

    generator = torch.Generator().manual_seed(0)
    training_batch(images, torch.arange(batch), generator, 0.45, 0.23)  # warm-up
    start, done = time.perf_counter(), 0
    while done < n:
        idx = torch.randint(0, len(images), (batch,), generator=generator)
        training_batch(images, idx, generator, 0.45, 0.23)
        done += batch
    return done / (time.perf_counter() - start)


def seed_img_s(data: str, size: int, batch: int, n: int, workers: int) -> float:
    from torchvision import datasets, transforms

    # the seed's training transforms, on the RGB images ImageFolder's default loader gives
    # (the seed fed 3-channel ImageNet models)
    tf = transforms.Compose([
        transforms.Resize((size, size)),
        transforms.RandomEqualize(),
        transforms.RandomRotation((-25, 20)),
        transforms.RandomResizedCrop(size, scale=(0.64, 1.0), ratio=(1.0, 1.0)),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(os.path.join(data, "train"), tf), batch_size=batch,
                                         shuffle=True, num_workers=workers, persistent_workers=False)
    start, done = time.perf_counter(), 0
    for x, _ in loader:
        done += len(x)
        if done >= n:
            break
    return done / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True, help="ImageFolder with train/ (e.g. chest_xray, the Kermany layout)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3, help="seed and project measured alternately this many times")
    a = p.parse_args()
    workers = os.cpu_count() or 1
    images = train_images(a.data, a.image_size)
    seed, project = [], []
    for _ in range(a.repeats):
        seed.append(seed_img_s(a.data, a.image_size, a.batch_size, a.images, workers))
        project.append(project_img_s(images, a.batch_size, a.images))
    ratios = [p / s for p, s in zip(project, seed, strict=True)]
    print(json.dumps({"benchmark": "data_path", "image_size": a.image_size, "images": a.images,
                      "cpu_cores": workers, "torch_threads": torch.get_num_threads(), "repeats": a.repeats,
                      "project_img_s": round(statistics.median(project), 1),
                      "seed_img_s": round(statistics.median(seed), 1),
                      "ratio": round(statistics.median(ratios), 2), "ratios": [round(r, 2) for r in ratios]}))


if __name__ == "__main__":
    main()
