"""The planner's compile cache: keyed by what shapes the program, re-estimated on every hit.

No compile: a stand-in for `xar_jax.aot.compile_report` leaves a hand-written HLO module.
"""

import gzip
import shutil

import pytest
from conftest import REPO, TINY_CONFIG
from test_step_estimate import LOOP

from xar_jax import hlo_report, plan, tpu_topology
from xar_jax.train_config import load_config_file


def _stale_compile(calls):
    """A compile_report that writes LOOP as the program and reports a stale estimate."""

    def compile_report(config, topo, *, what, estimate, config_name, hlo_file=None):
        calls.append(config_name)
        with gzip.open(hlo_file, "wt") as f:
            f.write(LOOP)
        return {
            "what": what,
            "num_slices": 1,
            "chips": topo.chips,
            "mesh": {"dcn": 1, "data": 1, "fsdp": topo.chips, "tensor": 1},
            "per_chip_batch": config.train.global_batch_size // topo.chips,
            "global_batch": config.train.global_batch_size,
            "hbm_per_chip_gib": {"total": 1.0},
            "hbm_capacity_gib": 1e-9,  # Stale too: the chip table now says otherwise.
            "fits": False,
            "compile_s": 1.0,
            "collectives": {},
            "est_step_s": 123.0,  # What an older estimator said.
        }

    return compile_report


def test_a_cached_report_is_re_estimated_from_its_hlo_without_compiling(tmp_path):
    config, topo = load_config_file(TINY_CONFIG), tpu_topology.parse("v5e-4")
    calls = []
    cache = plan.ReportCache(str(tmp_path), "jax 0 libtpu 0")
    first = plan.Evaluator(
        config,
        topo,
        compile_report=_stale_compile(calls),
        cache=cache,
        depth_points=None,
        config_name="tiny",
    )
    assert first.report(config)["est_step_s"] == 123.0 and first.compiles == 1
    key = cache.key(config, topo, "train")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{key}.hlo.gz", f"{key}.json"]

    again = plan.Evaluator(
        config,
        topo,
        compile_report=lambda *a, **k: pytest.fail("a cached program was compiled again"),
        cache=plan.ReportCache(str(tmp_path), "jax 0 libtpu 0"),
        depth_points=None,
        config_name="tiny",
    )
    hit = again.report(config)
    assert again.compiles == 0 and again.cache.hits == 1
    want = hlo_report.from_hlo({"what": "train", "num_slices": 1, "chips": 4}, LOOP, config, topo)
    assert hit["est_step_s"] == pytest.approx(want["est_step_s"]) and hit["est_step_s"] < 1
    assert hit["collectives"]["all-reduce"]["count"] == 1
    assert hit["hbm_capacity_gib"] == topo.generation.hbm_gib and hit["fits"] is True
    assert hit["compile_s"] == 1.0  # The compiler's own numbers are kept.


def test_the_key_follows_the_program_not_the_estimator(tmp_path, monkeypatch):
    package = tmp_path / "xar_jax"
    shutil.copytree(f"{REPO}/xar_jax", package, ignore=shutil.ignore_patterns("__pycache__"))
    digest = plan.source_digest(str(package))
    for name in sorted(plan.REPORT_SOURCES):
        with open(package / name, "a") as f:
            f.write("\n# an estimator or report change\n")
    assert plan.source_digest(str(package)) == digest
    with open(package / "model.py", "a") as f:
        f.write("\n# a model change\n")
    assert plan.source_digest(str(package)) != digest

    config, cache = load_config_file(TINY_CONFIG), plan.ReportCache(None, "jax 0 libtpu 0")
    v5e, v6e = tpu_topology.parse("v5e-4"), tpu_topology.parse("v6e-4")
    assert cache.key(config, v5e, "train") != cache.key(config, v6e, "train")
    assert cache.key(config, v5e, "train") != cache.key(config, v5e, "sample")
    with config.unlocked():
        config.model.remat = "full"
    assert cache.key(config, v5e, "train") != cache.key(load_config_file(TINY_CONFIG), v5e, "train")
    key = cache.key(config, v5e, "train")
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_tpu_enable_windowed_einsum_for_all_gather=false")
    assert cache.key(config, v5e, "train") != key
