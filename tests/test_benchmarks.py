"""The benchmark scripts run end to end on a CPU with tiny configs (smoke tests).

Speed is measured on the GPU (docs/benchmarks.md), never here; these only keep the scripts working.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import FAST_COMPILE_FLAGS

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _run(module, *args):
    out = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args, "--no_json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        # Compile time dominates these smoke runs; their timings are not checked.
        env=os.environ
        | {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE_FLAGS, "PYTHONPATH": ROOT},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _table(out):
    """The summary table printed last: {column: value} of its one row."""
    lines = [line for line in out.splitlines() if " | " in line]
    header, row = lines[-2], lines[-1]
    return dict(
        zip(
            [c.strip() for c in header.split(" | ")],
            [c.strip() for c in row.split(" | ")],
            strict=True,
        )
    )


def test_train_step_benchmark_times_the_trainers_step_with_resolved_settings():
    # The trainer's program for a config with overrides and a named override set; 'auto' layers
    # resolved as experiment.build does on this backend (CPU: the layer scan).
    out = _run(
        "train_step",
        "--config=configs/tiny.py",
        "--config.model.scan_layers=auto",
        "--config.model.remat=auto",
        "--overrides=fast",
        "--steps=1",
        "--repeats=1",
        # An XLA option for this compile only, typed (a bool) as XLA reads it.
        "--xla_option=xla_cpu_enable_fast_math=false",
    )
    row = _table(out)
    assert (row["model"], row["batch"]) == ("custom", "8")
    assert (row["attention_impl"], row["attn_dropout"]) == ("xla", "0")  # 'fast': no attn dropout.
    assert (row["scan_layers"], row["remat"]) == ("True", "dots_no_batch")
    assert row["prng_impl"] == "threefry2x32"
    assert float(row["img_per_s"]) > 0 and float(row["final_loss"]) > 0


def test_benchmarks_refuse_an_unknown_override_set():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.train_step",
            "--config=configs/tiny.py",
            "--overrides=fastest",
            "--no_json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT},
    )
    assert out.returncode != 0 and "--overrides='fastest'; allowed: fast" in out.stderr


def test_sample_benchmark_times_the_sampler_of_the_config():
    row = _table(
        _run("sample", "--config=configs/tiny.py", "--config.sample.batch_size=2", "--repeats=1")
    )
    assert (row["model"], row["batch"], row["num_steps"]) == ("custom", "2", "2")
    assert float(row["img_per_s"]) > 0


def test_attention_layer_benchmark_checks_and_times_the_kernel():
    out = _run(
        "attention_layer", "--tiny", "--batch", "1", "--heads", "2", "--head_dim", "16",
        "--iters", "1", "--repeats", "1",
    )  # fmt: skip
    assert "rel L2" in out and "FAILED" not in out
    assert any(line.startswith("pallas_drop") for line in out.splitlines())


def test_cached_attention_benchmark_checks_and_times_the_kernel():
    out = _run("cached_attention", "--tiny", "--iters", "1", "--repeats", "1", "--block_k", "16,32")
    assert "rel L2" in out and "FAILED" not in out
    lines = out.splitlines()
    # The concatenating path and both kernel tilings, for both prefixes of the tiny shape.
    for row in ("concat_xla", "pallas_q64_k16_w4_s2", "pallas_q64_k32_w4_s2"):
        assert any(line.startswith(f"{row}_p48") for line in lines), row
        assert any(line.startswith(f"{row}_p16") for line in lines), row


def test_gpu_compile_only_estimates_a_saved_program(tmp_path):
    # --from_hlo: the estimate of a program saved by --hlo_dir, without the CUDA plugin. The
    # program here is one bf16 matmul (compiled for the CPU, never run), so the compute term
    # is its FLOPs at the H200's measured bf16 ceiling.
    import jax
    import jax.numpy as jnp

    from xar_jax import tpu_topology

    n = 16384
    s = jax.ShapeDtypeStruct((n, n), jnp.bfloat16)
    text = jax.jit(lambda a, b: a @ b).lower(s, s).compile().as_text()
    (tmp_path / "tiny_train_step.hlo.txt").write_text(text)
    # A profile of the same program: the matmul's kernel and a reduction, per step.
    kernels = [{"name": "nvjet_sm90_tst_128x160", "ms_per_call": 12.0, "count_per_call": 1}]
    kernels.append({"name": "input_reduce_fusion_3", "ms_per_call": 1.0, "count_per_call": 1})
    (tmp_path / "prof_tiny.json").write_text(json.dumps({"kernels": kernels}))

    def estimate_cli(*flags):
        return subprocess.run(
            [sys.executable, "-m", "benchmarks.gpu_compile_only", "--models=tiny", *flags],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            env=os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT},
        )

    out = estimate_cli("--batch=64", f"--from_hlo={tmp_path}", f"--profile={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    estimate, per_class = out.stdout.split("| class ")
    row = _table(estimate)
    assert (row["model"], row["batch"], row["opaque_kernels"]) == ("tiny", "64", "0")
    peak = tpu_topology.H200_MEASURED.peak_bf16_tflops
    assert float(row["compute_ms_ceil"]) == round(2 * n**3 / (peak * 1e12) * 1e3, 1)
    assert float(row["est_ms_ceil"]) >= float(row["compute_ms_ceil"])
    assert float(row["est_ms_sheet"]) < float(row["est_ms_ceil"])  # The datasheet is faster.
    # Predicted against profiled time per kernel class: the matmul is the GEMM class, at its
    # compute term; the classes add up to the step.
    classes = {
        cells[1]: [float(c) if c != "None" else None for c in cells[2:]]
        for line in per_class.splitlines()
        if (cells := [c.strip() for c in line.split("|")])[0] == "tiny"
    }
    gemm_ms = float(row["compute_ms_ceil"])
    assert classes["gemm"][:2] == [gemm_ms, 12.0]
    assert classes["gemm"][2] == pytest.approx(gemm_ms / 12, abs=0.01)
    assert classes["reduction"] == [0.0, 1.0, 0.0]
    assert classes["attention"] == [0.0, 0.0, None]
    assert sum(c[0] for c in classes.values()) == pytest.approx(float(row["est_ms_ceil"]), abs=0.2)

    # --tag: another program of the model (benchmarks/gpu_profile.sh with TAG and OVERRIDES), its
    # HLO dump and profile named with the tag, compared with the profile's own wall time per step
    # at the profile's batch.
    import gzip

    with gzip.open(tmp_path / "hlo_tiny_bs32.txt.gz", "wt") as f:
        f.write(text)
    profile = {"batch": 32, "wall_ms_per_call": 40.0, "kernels": kernels}
    (tmp_path / "prof_tiny_bs32.json").write_text(json.dumps(profile))
    tagged = estimate_cli(f"--from_hlo={tmp_path}", f"--profile={tmp_path}", "--tag=_bs32")
    assert tagged.returncode == 0, tagged.stderr[-3000:]
    row = _table(tagged.stdout.split("| class ")[0])
    assert (row["model"], row["batch"], float(row["measured_img_s"])) == ("tiny_bs32", "32", 800.0)
    assert float(row["pred/meas_ceil"]) == pytest.approx(
        float(row["est_img_s_ceil"]) / 800.0, rel=0.01
    )
