"""bench/gpu.py on the CPU (--dry): every step end to end, only the diffusers comparisons skipped without diffusers,
a failed or over-time step recorded while the next one runs, diffusers imported from a wheel brought along."""
import json
import os
import subprocess
import sys
import time
import zipfile

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import cp  # noqa: E402
import gpu  # noqa: E402


def run_dry(tmp_path, *flags, env=None):
    cmd = [sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--dry", "--work", str(tmp_path / "work"),
           "--out", str(tmp_path / "GPU.md"), "--json", str(tmp_path / "gpu.json"), *flags]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **(env or {})), timeout=900)
    with open(tmp_path / "gpu.json") as f:
        results = json.load(f)
    return p, results, (tmp_path / "GPU.md").read_text()


@pytest.mark.slow
def test_dry_run_does_every_step(tmp_path):
    p, results, md = run_dry(tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    steps = results["steps"]
    assert list(steps) == list(gpu.STEPS)
    assert {k: s["status"] for k, s in steps.items()} == {k: "ok" for k in gpu.STEPS}, p.stdout
    assert results["torch"] and results["triton"] and results["device"] and results["dry"]
    assert steps["tests"]["counts"]["passed"] > 0 and "failed" not in steps["tests"]["counts"]
    kernel = [r for r in steps["kernel"]["rows"] if r["section"] == "kernel"]
    assert {r["case"] for r in kernel} == {"fisher", "task", "dsc", "sweep"}
    assert sorted({r["B"] * r["K"] for r in kernel if r["case"] == "sweep"}) == [4, 16, 64]
    assert {r["dtype"] for r in kernel} == {"bfloat16", "float16", "float32"}
    assert all(r["eager_fwdbwd_ms"] > 0 and r["eager_fwd_ms"] > 0 and r["auto"] == "reference" for r in kernel)
    (share,) = [r for r in steps["kernel"]["rows"] if r["section"] == "kernel-step"]
    assert share["unet_fwdbwd_ms"] > 0 and 0 < share["eager_share"] < 1
    unet_rows = steps["unet-bf16"]["rows"] + steps["unet-fp16"]["rows"]
    assert sorted((r["shape"], r["mode"]) for r in unet_rows) == sorted(
        [(f"{b}x4x8x8", m) for b in (1, 4) for m in ("forward", "forward+backward")] * 2)
    assert steps["model"]["vocab"] == 49408  # SD's vocabulary: the new token's row is row 49,408
    for method in ("seq", "ewc-dc", "dsc-ewc-dc"):  # DSC's timed task is its second: the first is not consolidated
        r = steps[f"train-{method}"]
        assert r["method"] == method and r["concepts"] == 1 + (method == "dsc-ewc-dc") and r["train_steps_per_s"] > 0
    assert steps["train-dsc-ewc-dc"]["consolidate_steps_per_s"] > 0
    assert steps["train-task2"]["concepts"] == 2  # the ewc-dc state reloaded and continued
    assert steps["sample"]["seconds_per_image"] > 0 and steps["sample"]["grid"] == [32, 16]
    rows = steps["methods"]["rows"]
    assert [(r["method"], r["checkpointing"]) for r in rows[:-2]] == [(m, c) for m in cp.METHODS for c in (False, True)]
    assert [(r["precision"], r["grad_accum"]) for r in rows[-2:]] == [("fp16", 1), ("fp32", 2)]
    assert all(r["train_steps_per_s"] > 0 for r in rows)
    assert "Dry run on the CPU" in md and all(f"| {k} | ok |" in md for k in gpu.STEPS)
    assert "| task | bfloat16 | 8 | 3 |" in md and "the task loss's share of the step: eager" in md


def test_without_diffusers_a_failed_step_does_not_stop_the_rest(tmp_path):
    shadow = tmp_path / "shadow" / "diffusers"  # earlier on the path than the installed one, and not importable
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError('No module named diffusers', name='diffusers')\n")
    p, results, md = run_dry(tmp_path, "--only", "sample,kernel,unet-bf16", env={"PYTHONPATH": str(shadow.parent)})
    assert p.returncode == 1
    steps = results["steps"]
    assert list(steps) == ["sample", "kernel", "unet-bf16"]
    assert steps["sample"]["status"] == "failed" and steps["sample"]["log_tail"]  # no state yet to sample from
    assert steps["kernel"]["status"] == "ok"
    assert steps["unet-bf16"]["status"] == "skipped" and "diffusers" in steps["unet-bf16"]["note"]
    assert results["diffusers"].startswith("absent")
    assert "## sample: failed" in md and "| unet-bf16 | skipped |" in md


def test_a_step_over_its_time_is_killed(tmp_path):
    start = time.time()
    p, results, _ = run_dry(tmp_path, "--only", "tests,kernel", "--budget", "6")
    assert p.returncode == 1
    assert results["steps"]["tests"]["status"] == "timeout"
    assert results["steps"]["kernel"]["status"] == "skipped" and "out of time" in results["steps"]["kernel"]["note"]
    assert time.time() - start < 40  # pytest and its children were stopped, not waited for


def test_diffusers_from_a_wheel_or_a_folder_of_wheels(tmp_path):
    wheels = tmp_path / ".whl"  # a folder named like a wheel is still a folder of wheels
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "diffusers-9.9.9-py3-none-any.whl", "w") as z:
        z.writestr("diffusers/__init__.py", "__version__ = '9.9.9'\n")
        z.writestr("diffusers-9.9.9.dist-info/METADATA", "Metadata-Version: 2.1\nName: diffusers\nVersion: 9.9.9\n")
    code = "import diffusers, importlib.metadata as m; print(diffusers.__version__, m.version('diffusers'))"
    for given in (wheels / "diffusers-9.9.9-py3-none-any.whl", wheels):
        path = gpu.find_diffusers(str(given), str(tmp_path / "work"))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=path))
        assert out.stdout.split() == ["9.9.9", "9.9.9"], out.stderr
    with pytest.raises(SystemExit):
        gpu.find_diffusers(str(tmp_path / "work"), str(tmp_path / "work2"))  # neither a wheel nor a package
