"""ingest step: an ImageFolder into the store as a content-addressed dataset version."""
from kfp import dsl

from pneumonia_kfp.components.kfp_defaults import component


@component
def ingest_op(data: str, storage: str, image_size: int, seed: int, on_invalid: str, dataset: dsl.Output[dsl.Dataset]):
    """Ingest an ImageFolder (local dir or s3:// prefix) into the store as a dataset version.

    Args:
        data: ImageFolder root, ``train|val|test/<class>/<image>``: a path, file:///dir or s3://bucket/prefix.
        storage: store URI the version is written to (s3://bucket/prefix, or file:///dir for local runs).
        image_size: side in pixels the images are decoded and resized to, once.
        seed: seed of a test split carved from train when the data has none.
        on_invalid: a file that does not decode: "fail" stops the run, "skip" leaves it out.
        dataset: the version's metadata (uri, sha, classes, counts per split and class), also as JSON.
    """
    from pneumonia_kfp.task_errors import recording_errors

    with recording_errors("ingest-op"):
        import json
        import logging

        from pneumonia_kfp.ingest import ingest

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        info = ingest(data, storage, image_size=image_size, seed=seed, on_invalid=on_invalid)
        dataset.metadata.update(info)
        with open(dataset.path, "w") as f:
            json.dump(info, f, indent=1)
