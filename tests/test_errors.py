"""User inputs that once escaped as tracebacks: each is now one line from the CLI (exit 2), or a
PneumoniaKfpError from the library (which a KFP task prints as its last line)."""
import pytest

from pneumonia_kfp import errors
from pneumonia_kfp.data import DataError
from pneumonia_kfp.pipelines.cli import main


@pytest.mark.parametrize("argv, env, message", [
    (["compile", "--max-parallel", "0"], {}, "max_parallel=0: must be at least 1"),
    (["run-local", "--epochs", "0"], {}, "epochs=0: must be at least 1"),
    (["run-local", "--batch-size", "0"], {}, "batch_size=0: must be at least 1"),
    (["run-local", "--backbones", "resnet18,"], {}, "has an empty name"),
    (["run-local"], {"PNEUMONIA_KFP_PROGRESS": "sometimes"}, "PNEUMONIA_KFP_PROGRESS='sometimes'"),
    (["ingest", "--data", "/nonexistent", "--storage", "file:///tmp/x", "--on-invalid", "skip",
      "--image-size", "20"], {}, "image_size=20: must be at least 32"),
])
def test_cli_answers_in_one_line(tmp_path, capsys, monkeypatch, argv, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if argv[0] == "run-local":
        argv = [*argv, "--output", str(tmp_path / "out")]
    elif argv[0] == "compile":
        argv = [*argv, "-o", str(tmp_path / "p.yaml")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith(f"pneumonia-kfp {argv[0]}: error: ") and message in err


def test_every_user_facing_error_shares_the_base_class():
    from pneumonia_kfp.backbones import BackboneError
    from pneumonia_kfp.pipelines.settings import SettingsError
    from pneumonia_kfp.pipelines.submit import SubmitError
    from pneumonia_kfp.storage import StorageError

    for cls in (DataError, errors.UsageError, BackboneError, SettingsError, SubmitError, StorageError):
        assert issubclass(cls, errors.PneumoniaKfpError), cls


def test_library_checks_raise_the_base_class(image_folder, tmp_path):
    from pneumonia_kfp.ingest import ingest
    from pneumonia_kfp.pipelines.pipeline import build_pipeline
    from pneumonia_kfp.training import train

    info = ingest(str(image_folder), (tmp_path / "store").as_uri(), image_size=32)
    with pytest.raises(errors.PneumoniaKfpError, match="epochs=0"):
        train(info["uri"], "resnet18", str(tmp_path / "m.pt"), epochs=0)
    with pytest.raises(errors.PneumoniaKfpError, match="batch_size=0"):
        train(info["uri"], "resnet18", str(tmp_path / "m.pt"), batch_size=0)
    with pytest.raises(errors.PneumoniaKfpError, match="max_parallel=0"):
        build_pipeline(0)
