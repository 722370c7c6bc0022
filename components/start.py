"""start step: this run's folder in the store, where every evaluate leaves its results for the report."""
from typing import NamedTuple

from pneumonia_kfp.components.kfp_defaults import component


@component
def start_op(storage: str) -> NamedTuple("Outputs", [("run_dir", str)]):
    """Make a fresh run folder ``<storage>/runs/<key>`` (never cached: each run gets its own).

    Args:
        storage: store URI (s3://bucket/prefix, or file:///dir for local runs).

    Returns:
        run_dir: the run folder's URI.
    """
    from pneumonia_kfp.task_errors import recording_errors

    with recording_errors("start-op"):
        from collections import namedtuple

        from pneumonia_kfp.runs import new_run

        return namedtuple("Outputs", ["run_dir"])(new_run(storage))
