"""Plans: `python -m xar_jax.aot --plan` finds settings that fit a slice; the trainer takes them.

The planner compiles for an abstract TPU slice (libtpu, no TPU); the planned overrides then run
one training step through `python -m xar_jax.main` on as many CPU devices as the slice has chips.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, TINY_CONFIG, run_main

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None and not os.environ.get("CI"),
    reason="libtpu is not installed here (pip install -e '.[tpu]'; .ci/run installs it)",
)


def _plan(cache, *args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "xar_jax.aot",
            "--plan",
            f"--config={TINY_CONFIG}",
            "--topology=v5litepod-4",
            "--plan_meshes=1",
            f"--plan_cache={cache}",
            "--json=-",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    """The plan of configs/tiny.py (global batch 8) for a v5e-4, compiles cached in a temp dir."""
    cache = tmp_path_factory.mktemp("plan_cache")
    return _plan(cache), cache


def test_plan_keeps_the_global_batch_with_bounded_compiles_and_a_cached_rerun(tiny_plan):
    plan, cache = tiny_plan
    assert plan["fits"] is True and plan["global_batch"] == 8 and plan["chips"] == 4
    assert plan["grad_accum_steps"] * plan["microbatch_per_chip"] * plan["chips"] == 8
    # One mesh x one remat policy: the whole batch (2 per chip) fits, one compile; the winner
    # (no accumulation) is that program, so compiling it as planned hits the cache.
    assert plan["search"]["compiles"] == 1, plan["search"]
    assert plan["verified"]["compiled"] == [
        {"grad_accum_steps": 1, "fits": True, "hbm_total_gib": plan["hbm_per_chip_gib"]["total"]}
    ]
    assert plan["est_step_s"] > 0 and 0 < plan["est_mfu"] < 1
    assert plan["hbm_per_chip_gib"]["total"] <= plan["hbm_capacity_gib"]
    line = plan["override_line"]
    assert line == " ".join(plan["overrides"]) and "--config.mesh.fsdp=4" in line
    again = _plan(cache)
    assert again["search"]["compiles"] == 0 and again["search"]["cache_hits"] == 2
    assert again["override_line"] == line


def test_trainer_runs_a_step_with_the_planned_line_and_refuses_mismatched_plans(
    tiny_plan, tmp_path
):
    plan, _ = tiny_plan
    done = run_main(
        tmp_path / "run",
        "--config.train.num_steps=1",
        "--config.log.sample_every_steps=0",
        *plan["overrides"],
        devices=4,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "1").exists()
    # The plan file: checked against the config without devices (launch checks), refused
    # before any compile on devices it was not made for.
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    check = run_main(tmp_path / "c", f"--config.train.plan={path}", "--check_only")
    assert check.returncode == 0 and check.stdout.strip() == "ok", check.stderr[-2000:]
    proc = run_main(tmp_path / "r", f"--config.train.plan={path}", devices=4)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "train.plan" in last and "4 TPU v5e chips" in last and "cpu" in last, last
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_plan_for_another_batch_or_model_and_auto_off_tpu_are_refused(tiny_plan):
    import jax

    from xar_jax import plan_file
    from xar_jax.errors import UserError
    from xar_jax.train_config import load_config_file

    plan, _ = tiny_plan
    config = load_config_file(TINY_CONFIG)
    plan_file.check_plan(plan, config, devices=None)  # Made for this config.
    with config.unlocked():
        config.train.global_batch_size = 16
    with pytest.raises(UserError, match="global batch 8"):
        plan_file.check_plan(plan, config, devices=None)
    with config.unlocked():
        config.train.global_batch_size, config.model.width = 8, 64
    with pytest.raises(UserError, match="another model: width 32 there, 64 here"):
        plan_file.check_plan(plan, config, devices=None)
    with config.unlocked():
        config.train.plan = "auto"
    with pytest.raises(UserError, match="train.plan='auto' searches on TPU devices"):
        plan_file.config_with_plan(config, devices=jax.devices(), argv=[])


def test_prediction_is_linear_in_the_microbatch_and_charges_the_accumulator():
    from xar_jax import plan as plan_lib

    def report(micro, total, step):
        return {
            "chips": 4,
            "peak_bf16_tflops": 100.0,
            "hbm_capacity_gib": 16.0,
            "fits": True,
            "global_batch": 4 * micro,
            "per_chip_batch": micro,
            "model_flops_per_step": 1e12 * micro,
            "est_step_s": step,
            "hbm_per_chip_gib": {"arguments": 4.0, "temporaries": total - 4.0, "total": total},
        }

    lo, hi = (8, report(8, 6.0, 0.010)), (32, report(32, 12.0, 0.034))
    r = plan_lib.predict(lo, hi, 16, 4, 4)  # 4 microbatches of 16 per chip.
    assert r["hbm_per_chip_gib"]["total"] == pytest.approx(8.0 + 1.0)  # + 1/4 of arguments
    assert r["est_step_s"] == pytest.approx(4 * 0.018)
    assert (r["global_batch"], r["per_chip_batch"], r["grad_accum_steps"]) == (256, 64, 4)
    assert r["est_mfu"] == pytest.approx(64e12 / (4 * 100e12 * 4 * 0.018))
    assert plan_lib.predict(lo, hi, 64, 1, 4)["fits"] is False  # 20 GiB of 16
