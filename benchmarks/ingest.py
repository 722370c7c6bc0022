"""First ingest and unchanged re-ingest of an ImageFolder into a fresh file store.

Last line: {"images", "first_s", "reingest_s", "uploaded_on_reingest", ...}.
"""
import argparse
import json
import tempfile
import time

from pneumonia_kfp.ingest import ingest


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True, help="ImageFolder (e.g. ../shared/data/chest_xray_224)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--storage", help="store URI (default: a temporary directory)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        storage = a.storage or tmp
        start = time.perf_counter()
        first = ingest(a.data, storage, image_size=a.image_size)
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        again = ingest(a.data, storage, image_size=a.image_size)
        reingest_s = time.perf_counter() - start
    images = sum(sum(c.values()) for c in first["counts"].values())
    print(json.dumps({"benchmark": "ingest", "images": images, "image_size": a.image_size,
                      "first_s": round(first_s, 2), "reingest_s": round(reingest_s, 3),
                      "uploaded_first": first["uploaded"], "uploaded_on_reingest": again["uploaded"],
                      "same_version": first["sha"] == again["sha"]}))


if __name__ == "__main__":
    main()
