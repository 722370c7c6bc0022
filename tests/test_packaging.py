"""Installed, the project adds one package, pneumonia_kfp, and nothing generic to site-packages."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_installs_only_pneumonia_kfp(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    str(ROOT), "-w", str(tmp_path)], check=True, capture_output=True)
    [wheel] = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"pneumonia_kfp", wheel.name.split("-py")[0] + ".dist-info"}
    # the repository's components/ and pipelines/ are installed under the one package
    assert "pneumonia_kfp/components/train.py" in names and "pneumonia_kfp/pipelines/cli.py" in names


def test_the_library_never_imports_kfp():
    code = ("import sys, pneumonia_kfp, pkgutil, importlib\n"
            "for m in pkgutil.iter_modules(pneumonia_kfp.__path__):\n"
            "    if m.name not in ('components', 'pipelines'):\n"
            "        importlib.import_module('pneumonia_kfp.' + m.name)\n"
            "print(sorted(k for k in sys.modules if k == 'kfp' or k.startswith('kfp.')))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
