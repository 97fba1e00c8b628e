"""What a fresh install needs: no top-level name of the repository shadows an installed distribution, and a triton
that is missing or broken never stops the CPU path (train → sample runs on the PyTorch reference)."""
import importlib.metadata
import os
import subprocess
import sys
import types

import pytest

import dc_kernels
from conftest import ROOT
from test_cp import write_concept
from test_train_cli import FAST


def top_level_names(root):
    """The import names the repository puts on sys.path when a script of it runs: its .py files and its folders
    (a folder without __init__.py still imports, as a namespace package, where nothing else provides the name)."""
    names = set()
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if entry.endswith(".py"):
            names.add(entry[:-3])
        elif os.path.isdir(path) and entry.isidentifier() and not entry.startswith("."):
            names.add(entry)
    return names


def shadowed(names, provided):
    """{name: distributions} for each of our names that an installed distribution also provides."""
    return {name: provided[name] for name in sorted(names) if name in provided}


def test_no_top_level_name_is_also_an_installed_distributions():
    names = top_level_names(ROOT)
    assert {"cp", "unet", "lora", "dc_score", "dc_kernels", "train", "sample", "toy", "tests"} <= names
    assert shadowed(names, importlib.metadata.packages_distributions()) == {}


def test_the_collision_check_sees_a_collision(tmp_path):
    """The old name against what transformers needs today: Hugging Face's `kernels` distribution provides `kernels`."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "train.py").write_text("")
    provided = {"kernels": ["kernels"], "torch": ["torch"]}
    assert shadowed(top_level_names(str(tmp_path)), provided) == {"kernels": ["kernels"]}


BROKEN_TRITON = 'raise ImportError("libtriton.so: cannot open shared object file (a stand-in for a broken wheel)")\n'


@pytest.fixture
def broken_triton(tmp_path):
    """An environment whose first `triton` on the path fails to import, as a broken wheel or a missing driver library
    makes it fail, and no TRITON_INTERPRET."""
    (tmp_path / "site" / "triton").mkdir(parents=True)
    (tmp_path / "site" / "triton" / "__init__.py").write_text(BROKEN_TRITON)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), env.get("PYTHONPATH", "")])
    return env


def test_a_broken_triton_leaves_train_and_sample_on_the_reference(tiny_model_dir, tmp_path, broken_triton):
    concept = write_concept(str(tmp_path / "alpha"), 0)
    state, out = str(tmp_path / "state"), str(tmp_path / "alpha.png")
    for args in (["train.py", "--concept", concept, "--state", state, "--model", tiny_model_dir, "--method",
                  "ewc-dc", *FAST],
                 ["sample.py", "--state", state, "--prompt", "a photo of a <alpha>", "-n", "1", "--steps", "2",
                  "--out", out]):
        r = subprocess.run([sys.executable, *args], cwd=ROOT, env=broken_triton, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert os.path.getsize(out) > 0


def test_the_broken_triton_is_really_broken(broken_triton):
    """The stand-in fails the way the test above needs: an ImportError at `import triton`."""
    r = subprocess.run([sys.executable, "-c", "import triton"], env=broken_triton, capture_output=True, text=True)
    assert r.returncode == 1 and "ImportError: libtriton.so" in r.stderr


def test_a_cuda_call_with_a_broken_triton_warns_once_and_takes_the_reference(monkeypatch, capsys):
    monkeypatch.setattr(dc_kernels, "_fused", ImportError("libcuda.so.1: cannot open shared object file"))
    big_cuda = types.SimpleNamespace(is_cuda=True, shape=(64, 4, 4, 64, 64), numel=lambda: dc_kernels.KERNEL_MIN_NUMEL)
    assert dc_kernels.dc_loss_impl(big_cuda) == "reference" and dc_kernels.dc_loss_impl(big_cuda) == "reference"
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["warning: triton cannot be imported (ImportError: libcuda.so.1: cannot open shared object file); "
                     "the DC loss runs on its PyTorch reference"]
    with pytest.raises(RuntimeError, match="impl 'triton': triton cannot be imported"):
        dc_kernels.dc_loss_impl(big_cuda, "triton")


WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # as where Triton does not install (Windows, macOS)
import torch
import cp, dc_kernels, dc_score, sample, train  # noqa: F401
pred, noise = torch.randn(2, 3, 4, 5), torch.randn(2, 4, 5)
for impl in ("auto", "reference"):
    dc_score.dc_errors(pred, noise, impl=impl)
    dc_score.dc_cross_entropy(pred, noise, [2, 0], 0.1, impl=impl)
    dc_score.soft_cross_entropy(pred, noise, torch.rand(2, 3), 0.1, impl=impl)
assert dc_kernels.dc_loss_impl(pred) == "reference" and not dc_kernels.kernel_wins(pred)
assert "dc_kernels.fused" not in sys.modules
dc_score.dc_errors(pred, noise, impl="triton")
"""


def test_without_triton_the_reference_serves_every_call():
    r = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.stderr.strip().splitlines()[-1].startswith(
        "RuntimeError: impl 'triton': triton cannot be imported (ModuleNotFoundError: "), r.stderr[-2000:]
