"""The run folder: evaluate's results reach the report through the store (file:// and a real S3
server), and a store that is not ours is never created."""
import json

import pytest

from pneumonia_kfp.documents import RESULT_FORMAT, ModelResult, fields_of
from pneumonia_kfp.errors import DataError
from pneumonia_kfp.runs import load_results, new_run, save_result
from pneumonia_kfp.storage import CREATE_BUCKET_ENV, StorageError, minio_client_from_env, open_store


def result(backbone: str) -> dict:
    """A result document: its format and every field evaluate writes (the values play no part here)."""
    fields = {f: {} for f in fields_of(ModelResult)}
    return {**fields, "format": RESULT_FORMAT, "backbone": backbone, "test": {"auc": 0.9},
            "predictions": {"test": {"prob": [0.2]}}}


@pytest.mark.parametrize("scheme", ["file", "s3"])
def test_results_round_trip_through_a_fresh_run_folder(scheme, tmp_path, request):
    if scheme == "s3":
        request.getfixturevalue("s3_env")
        storage = "s3://run-folders/pneumonia-kfp"
    else:
        storage = (tmp_path / "store").as_uri()
    first, second = new_run(storage), new_run(storage)
    assert first != second and first.startswith(f"{storage}/runs/") and second.startswith(f"{storage}/runs/")
    assert json.loads(open_store(first).get_bytes("run.json"))["key"] == first.rsplit("/", 1)[1]
    for backbone in ("resnet18", "efficientnet_b0"):
        uri = save_result(first, result(backbone))
        assert uri == f"{first}/results/{backbone}.json"
    assert load_results(first, ["resnet18", "efficientnet_b0"]) == [result("resnet18"), result("efficientnet_b0")]
    with pytest.raises(DataError, match=r"runs/.*: no results for resnet18, efficientnet_b0 \(did its evaluate"):
        load_results(second, ["resnet18", "efficientnet_b0"])  # another run sees none of them


def test_a_result_under_the_wrong_name_is_refused(tmp_path):
    run = new_run(tmp_path.as_uri())
    open_store(run).put_bytes("results/resnet18.json", json.dumps(result("resnet50")).encode())
    with pytest.raises(DataError, match="results/resnet18.json holds results of 'resnet50'"):
        load_results(run, ["resnet18"])


def test_a_bucket_that_is_not_ours_is_never_created(s3_env, monkeypatch):
    monkeypatch.setenv(CREATE_BUCKET_ENV, "false")
    with pytest.raises(StorageError, match="NoSuchBucket"):
        new_run("s3://mlpipeline/private/team-a/pneumonia-kfp")
    client, _ = minio_client_from_env()
    assert not client.bucket_exists("mlpipeline")
    client.make_bucket("mlpipeline")  # Kubeflow's: there already
    run = new_run("s3://mlpipeline/private/team-a/pneumonia-kfp")
    assert run.startswith("s3://mlpipeline/private/team-a/pneumonia-kfp/runs/")
    monkeypatch.setenv(CREATE_BUCKET_ENV, "true")  # the default, for a store of the pipeline's own
    new_run("s3://pipelines-own-bucket/x")
    assert client.bucket_exists("pipelines-own-bucket")
