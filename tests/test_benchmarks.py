"""The GPU benchmark scripts run end to end on a CPU with shrunken networks (smoke tests).

Speed is measured on the GPU (docs/benchmarks.md), never here; these only keep the scripts working.
"""

import os
import subprocess
import sys

from conftest import FAST_COMPILE_FLAGS

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _run(script, *args):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), *args, "--tiny", "--no_json"],
        capture_output=True,
        text=True,
        timeout=300,
        # Compile time dominates these smoke runs; their timings are not checked.
        env=os.environ | {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE_FLAGS},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_train_step_benchmark_fast_recipe_prints_the_table():
    # L only: B's layers are the same in both recipes, and the paper-recipe test runs B.
    out = _run("train_step.py", "--models", "xar_l", "--recipe", "fast", "--batch", "2",
               "--steps", "1", "--repeats", "1")  # fmt: skip
    rows = [[c.strip() for c in line.split(" | ")] for line in out.splitlines()]
    table = {r[0]: r for r in rows if r[0].startswith("xar_") and len(r) > 5}
    # The summary table: L scanned with 'dots' remat, no attention dropout; scan outputs left
    # unfilled.
    assert table["xar_l"][8:10] == ["dot_product", "0"]
    assert table["xar_l"][12:15] == ["True", "dots", "uninitialised"]
    assert float(table["xar_l"][15]) > 0  # The final loss, for comparing A/B runs.


def test_train_step_benchmark_paper_recipe_keeps_attention_dropout():
    out = _run(
        "train_step.py", "--models", "xar_b,xar_h", "--recipe", "paper", "--batch", "2",
        "--steps", "1", "--repeats", "1",
        # An XLA option for this compile only, typed (a bool) as XLA reads it.
        "--xla_option", "xla_cpu_enable_fast_math=false",
    )  # fmt: skip
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("xar_")]
    table = {r[0].strip(): [c.strip() for c in r] for r in rows if len(r) > 5}
    # On a CPU 'auto' resolves to the XLA form; attention dropout 0.1, hash dropout.
    b, h = table["xar_b"], table["xar_h"]
    assert b[8:11] == ["xla", "0.1", "hash"] and b[12:15] == ["False", "none", "uninitialised"]
    assert h[8:11] == ["xla", "0.1", "hash"] and h[12:14] == ["True", "matmuls"]


def test_sample_benchmark_prints_the_table():
    out = _run(
        "sample.py", "--models", "xar_b", "--batch", "2", "--num_steps", "2", "--repeats", "1"
    )
    assert any(line.startswith("xar_b | 2 ") for line in out.splitlines())


def test_attention_layer_benchmark_checks_and_times_the_kernel():
    out = _run(
        "attention_layer.py", "--batch", "1", "--heads", "2", "--head_dim", "16",
        "--iters", "1", "--repeats", "1",
    )  # fmt: skip
    assert "rel L2" in out and "FAILED" not in out
    assert any(line.startswith("pallas_drop") for line in out.splitlines())


def test_cached_attention_benchmark_checks_and_times_the_kernel():
    out = _run("cached_attention.py", "--iters", "1", "--repeats", "1", "--block_k", "16,32")
    assert "rel L2" in out and "FAILED" not in out
    lines = out.splitlines()
    # The concatenating path and both kernel tilings, for both prefixes of the tiny shape.
    for row in ("concat_xla", "pallas_q64_k16_w4_s2", "pallas_q64_k32_w4_s2"):
        assert any(line.startswith(f"{row}_p48") for line in lines), row
        assert any(line.startswith(f"{row}_p16") for line in lines), row
