"""The typed, versioned documents: the checkpoint metadata, the exported model metadata, the per-model
result document and results.json. What today's writers write reads back; a missing or unknown format,
or a missing field, is one line naming the file, through the readers the commands and components use."""
import json
import shutil

import pytest
import torch

from pipelines.cli import main
from pneumonia_kfp import documents
from pneumonia_kfp.documents import CHECKPOINT_FORMAT, RESULT_FORMAT, RESULTS_FORMAT, DocumentError, fields_of
from pneumonia_kfp.evaluation import combine, evaluate
from pneumonia_kfp.export import CHECKPOINT, METADATA, ONNX, PT2, export_model, load_onnx
from pneumonia_kfp.report import render, write_outputs
from pneumonia_kfp.runs import load_results, new_run, result_key, save_result
from pneumonia_kfp.storage import open_store
from pneumonia_kfp.training import train


@pytest.fixture(scope="module")
def model(dataset, tmp_path_factory):
    """A model directory written by train and export: (directory, checkpoint metadata)."""
    out = tmp_path_factory.mktemp("model")
    meta = train(dataset["uri"], "resnet18", str(out / CHECKPOINT), epochs=1, batch_size=16, seed=0)
    export_model(out)
    return out, meta


@pytest.fixture(scope="module")
def result(dataset, model):
    """evaluate's result document of the model."""
    return evaluate(dataset["uri"], str(model[0]))


def _one_line(text: str, *parts: str) -> None:
    assert len(text.strip().splitlines()) == 1 and "Traceback" not in text, text
    for part in parts:
        assert part in text, (part, text)


DOCTORED = {  # how a document is doctored -> what its one line says
    "no format": "with no format field, this version reads format 1",
    "format 2": "with format 2, this version reads format 1",
    "format '1'": "with format '1', this version reads format 1",  # a string is not the integer
    "no tta": "lacks tta",
}


def _doctor(doc: dict, how: str) -> dict:
    doc = dict(doc)
    if how == "no format":
        del doc["format"]
    elif how == "no tta":
        del doc["tta"]
    else:
        doc["format"] = 2 if how == "format 2" else "1"
    return doc


# --- checkpoint metadata ---------------------------------------------------------------------------------

def test_train_writes_every_checkpoint_field_and_the_format(model):
    directory, meta = model
    saved = torch.load(directory / CHECKPOINT, weights_only=True)
    assert set(saved) - {"state_dict"} == set(documents.CheckpointMeta.__annotations__) == set(meta)
    assert saved["format"] == meta["format"] == CHECKPOINT_FORMAT
    assert saved["threshold_rule"] == "balanced" and saved["tta"] is False  # params' defaults, written out


@pytest.mark.parametrize("how", DOCTORED)
def test_a_doctored_checkpoint_is_one_line_from_evaluate_and_predict(how, model, data, tmp_path, capsys):
    directory = tmp_path / "m"
    shutil.copytree(model[0], directory)
    saved = torch.load(directory / CHECKPOINT, weights_only=True)
    torch.save(_doctor(saved, how), directory / CHECKPOINT)
    rc = main(["evaluate", "--model", str(directory), "--data", str(data), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "out").exists()
    _one_line(err, "pneumonia-kfp evaluate: error: ", f"{directory / CHECKPOINT}: checkpoint document",
              DOCTORED[how])
    image = next((data / "test" / "NORMAL").iterdir())
    rc = main(["predict", "--model", str(directory), "--engine", "checkpoint", str(image)])
    err = capsys.readouterr().err
    assert rc == 2
    _one_line(err, "pneumonia-kfp predict: error: ", str(directory / CHECKPOINT), DOCTORED[how])
    with pytest.raises(DocumentError, match="checkpoint document"):
        export_model(directory)


def test_a_checkpoint_of_an_earlier_version_is_refused_not_guessed(model, tmp_path):
    """Saved before the format existed, and without tta: never read as if tta were off."""
    saved = torch.load(model[0] / CHECKPOINT, weights_only=True)
    old = {k: v for k, v in saved.items() if k not in ("format", "tta")}
    torch.save(old, tmp_path / CHECKPOINT)
    from pneumonia_kfp.backbones import load_checkpoint

    with pytest.raises(DocumentError) as e:
        load_checkpoint(tmp_path / CHECKPOINT)
    _one_line(str(e.value), str(tmp_path / CHECKPOINT), "no format field", "regenerate it")


def test_writers_refuse_a_missing_or_an_unknown_field():
    fields = {f: 0 for f in fields_of(documents.CheckpointMeta) if f != "format"}
    assert documents.checkpoint_meta(**fields)["format"] == CHECKPOINT_FORMAT
    with pytest.raises(TypeError, match=r"missing \['tta'\]"):
        documents.checkpoint_meta(**{k: v for k, v in fields.items() if k != "tta"})
    with pytest.raises(TypeError, match=r"unknown \['tta_mode'\]"):
        documents.checkpoint_meta(**fields, tta_mode="x")


# --- the exported model's metadata -----------------------------------------------------------------------

def test_the_exported_metadata_reads_back_from_every_form(model):
    directory, meta = model
    written = json.loads((directory / "metadata.json").read_text())
    _, inside = load_onnx(directory / ONNX)
    assert written == inside and written["format"] == documents.MODEL_INFO_FORMAT
    assert written["thresholds"] == meta["thresholds"] and written["tta_used_in_evaluation"] is meta["tta"]


def test_an_onnx_model_with_metadata_of_another_format_is_one_line_from_predict(model, data, tmp_path, capsys):
    import onnx

    directory = tmp_path / "m"
    shutil.copytree(model[0], directory)
    (directory / PT2).unlink()
    proto = onnx.load(str(directory / ONNX))
    (prop,) = [p for p in proto.metadata_props if p.key == METADATA]
    prop.value = json.dumps({**json.loads(prop.value), "format": 7})
    onnx.save(proto, str(directory / ONNX))
    image = next((data / "test" / "NORMAL").iterdir())
    assert main(["predict", "--model", str(directory), str(image)]) == 2
    _one_line(capsys.readouterr().err, "pneumonia-kfp predict: error: ", f"{directory / ONNX} ({METADATA})",
              "model metadata document with format 7")


# --- the result document ---------------------------------------------------------------------------------

def test_evaluates_result_reads_back_through_the_run_folder(model, result, tmp_path):
    assert result["format"] == RESULT_FORMAT and set(fields_of(documents.ModelResult)) <= set(result)
    assert result["tta"] is model[1]["tta"] is False and result["recipe"] == model[1]["recipe"]
    run = new_run(tmp_path.as_uri())
    save_result(run, result)
    assert load_results(run, ["resnet18"]) == [json.loads(json.dumps(result))]


@pytest.mark.parametrize("how", DOCTORED)
def test_a_doctored_result_is_one_line_from_the_reports_reader(how, result, tmp_path):
    run = new_run(tmp_path.as_uri())
    open_store(run).put_bytes(result_key("resnet18"), json.dumps(_doctor(result, how)).encode())
    with pytest.raises(DocumentError) as e:
        load_results(run, ["resnet18"])
    _one_line(str(e.value), f"{run}/{result_key('resnet18')}: result document", DOCTORED[how])


# --- results.json ----------------------------------------------------------------------------------------

def test_results_json_reads_back(dataset, result, tmp_path):
    results, md, page, csv = render(combine(dataset, [result]))
    write_outputs(tmp_path, results, md, page, csv)
    path = tmp_path / "results.json"
    read = documents.read_results(json.loads(path.read_text()), str(path))
    assert read["format"] == RESULTS_FORMAT and set(fields_of(documents.Results)) <= set(read)
    assert [m["backbone"] for m in read["models"]] == ["resnet18"] and read["best"]["backbone"] == "resnet18"
    assert "predictions" not in read["models"][0]  # they go to predictions.csv


@pytest.mark.parametrize("how", ["no format", "format 2", "no best", "a model of format 2"])
def test_a_doctored_results_json_is_one_line(how, dataset, result, tmp_path):
    results = render(combine(dataset, [result]))[0]
    if how == "no best":
        del results["best"]
    elif how == "a model of format 2":
        results["models"][0]["format"] = 2
    else:
        results = _doctor(results, how)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    with pytest.raises(DocumentError) as e:
        documents.read_results(json.loads(path.read_text()), str(path))
    says = {"no format": "results.json document with no format field", "format 2": "with format 2",
            "no best": "lacks best", "a model of format 2": "models[0]: result document with format 2"}[how]
    _one_line(str(e.value), str(path), says)
