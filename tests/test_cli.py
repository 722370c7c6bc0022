import pytest

from pneumonia_kfp.pipelines.cli import main


@pytest.mark.parametrize("args, message", [
    (["--data", "/does/not/exist"], "/does/not/exist does not exist"),
    (["--backbones", "resnet18,resnet18"], "more than once"),
    (["--backbones", " , "], "is empty"),
    (["--backbones", "resnet181"], "unknown backbone 'resnet181'"),
    (["--epochs", "0"], "epochs=0: must be at least 1"),
    (["--batch-size", "-1"], "batch_size=-1"),
    (["--backbones", "resnet18", "--image-size", "16"], "image_size=16: must be at least 32"),
    (["--backbones", "resnet18,"], "has an empty name (a stray comma?)"),
    (["--learning-rate", "nan"], "learning_rate=nan: must be a finite number"),
    (["--learning-rate", "0"], "learning_rate=0.0: must be greater than 0"),
    (["--image-size", "100000"], "image_size=100000: must be at most 1024"),
    (["--max-parallel", "0"], "max_parallel=0: must be at least 1"),
    (["--backbones", "vit_base_patch16_224", "--image-size", "64"], "takes only 224 px"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, args, message):
    rc = main(["run-local", "--output", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_malformed_data_directory(tmp_path, capsys):
    (tmp_path / "data" / "images").mkdir(parents=True)
    assert main(["run-local", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "o")]) == 2
    assert "has no train/ folder" in capsys.readouterr().err


def test_ingest_prints_the_dataset_uri(image_folder, tmp_path, capsys):
    storage = (tmp_path / "store").as_uri()
    assert main(["ingest", "--data", str(image_folder), "--storage", storage, "--image-size", "32"]) == 0
    uri = capsys.readouterr().out.strip().splitlines()[-1]
    assert uri.startswith(storage + "/datasets/")
    assert (tmp_path / "store" / uri.split("/store/")[1] / "manifest.json").is_file()
