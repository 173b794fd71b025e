"""What a user gets from a regular, non-editable install, and how a backend is chosen without code changes.

test_non_editable_install_runs_the_cpu_kernel installs this checkout with pip into a fresh virtual
environment, runs from a directory outside the repository, and checks that backend "auto" on CPU tensors runs
the C++ kernel compiled from the source inside site-packages, with no fallback warning. It compiles the kernel
into an empty extensions folder, so it takes as long as one build (about a minute of CPU).

The fresh environment sees the packages of the interpreter running the tests (torch, pip, setuptools, ninja:
nothing is downloaded, no index is contacted) through a .pth file naming that interpreter's site-packages.
Not through `venv --system-site-packages`: run from inside a virtual environment, that exposes the *base*
interpreter's site-packages, which on a fresh machine hold neither torch nor a setuptools that builds wheels.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from truth import truth_dynsdpb

from dynsdpb_kernels import backends, resolve_backend

REPO = Path(__file__).resolve().parents[1]

# Runs inside the fresh environment; -W error turns a fallback RuntimeWarning into a failure.
PROBE = """
import json, sys, torch
import dynsdpb_kernels
from dynsdpb_kernels import cpu_kernel, dynsdpb_loss, resolve_backend

torch.manual_seed(0)
logits = torch.randn(6, 3000).requires_grad_()
labels = torch.randint(0, 3000, (6,))
teacher = torch.randn(6, 3000)
mask = torch.tensor([True, False, True, True, False, True])
loss = dynsdpb_loss(logits, labels, teacher, mask)  # backend="auto"
loss.backward()
torch.save({"logits": logits.detach(), "labels": labels, "teacher": teacher, "mask": mask,
            "loss": loss.detach(), "grad": logits.grad}, sys.argv[1])
from importlib.metadata import requires
print(json.dumps({"requires": requires("dynsdpb-kernels"), "package": dynsdpb_kernels.__file__, "source": str(cpu_kernel.SOURCE),
                  "backend": resolve_backend("auto", torch.device("cpu")), "build": cpu_kernel.build_info()}))
"""


def _site_packages_of_this_interpreter() -> list[str]:
    """Where the running interpreter's installed packages are (a venv's own, not the base interpreter's)."""
    folders = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    return list(dict.fromkeys(folder for folder in folders if Path(folder).is_dir()))


def test_non_editable_install_runs_the_cpu_kernel(tmp_path):
    venv = tmp_path / "venv"
    # without a pip of its own: this interpreter's pip and setuptools (a venv's bundled setuptools may be too
    # old to build a wheel) are seen through the .pth file, after the new environment's own site-packages
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site_packages = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    (site_packages / "_dynsdpb_test_outer.pth").write_text("\n".join(_site_packages_of_this_interpreter()) + "\n")
    install = [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", str(REPO)]
    installed = subprocess.run(install, cwd=tmp_path, capture_output=True, text=True)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", backends.BACKEND_VARIABLE)}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "torch_extensions")
    env.pop("TRITON_INTERPRET", None)
    result_file = tmp_path / "result.pt"
    done = subprocess.run([str(python), "-W", "error::RuntimeWarning", "-c", PROBE, str(result_file)],
                          cwd=outside, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])

    assert Path(report["package"]).is_relative_to(site_packages), report  # the installed copy, not this checkout
    assert Path(report["source"]).is_file() and Path(report["source"]).is_relative_to(site_packages), report
    assert report["backend"] == "cpu", report
    assert any(r.split(";")[0].strip().startswith("ninja") for r in report["requires"]), report  # builds the kernel
    assert report["build"]["extension"] == f"dynsdpb_cpu_{report['build']['isa']}", report
    assert Path(report["build"]["path"]).is_relative_to(tmp_path / "torch_extensions"), report
    assert "RuntimeWarning" not in done.stderr, done.stderr

    ran = torch.load(result_file)
    truth = truth_dynsdpb(ran["logits"], ran["labels"], ran["teacher"], ran["mask"])
    assert torch.allclose(ran["loss"].double(), truth["loss"], rtol=2e-5), (ran["loss"], truth["loss"])
    assert torch.allclose(ran["grad"].double(), truth["grad"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["reference", "cpu"])
def test_environment_variable_replaces_auto(monkeypatch, name):
    monkeypatch.setenv(backends.BACKEND_VARIABLE, name)
    assert resolve_backend("auto", torch.device("cpu")) == name
    # an explicit argument wins over the variable
    assert resolve_backend("reference", torch.device("cpu")) == "reference"


def test_environment_variable_is_checked(monkeypatch):
    monkeypatch.setenv(backends.BACKEND_VARIABLE, "gpu")
    with pytest.raises(ValueError, match="DYNSDPB_BACKEND"):
        resolve_backend("auto", torch.device("cpu"))
    monkeypatch.setenv(backends.BACKEND_VARIABLE, "triton")
    if not backends.triton_interpreted():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_backend("auto", torch.device("cpu"))
    else:  # the suite runs Triton on the CPU through its interpreter
        assert resolve_backend("auto", torch.device("cpu")) == "triton"
