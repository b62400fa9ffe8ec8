"""On 8 simulated CPU devices, the sharded step (mesh data=4, fsdp=2) equals the 1-device step,
two slices train as one, and the paper's xAR-H train state shards over fsdp (shapes only).

JAX fixes its CPU device count at the first operation, so the comparisons run in a subprocess
(the rest of the suite keeps 1 device).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import FAST_COMPILE_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One subprocess trains a tiny scanned xAR for two donated steps (AdamW, gradient accumulation 2,
# a batch of 16) from the same initial state on three meshes: 1 device, one slice of 8 devices
# (data 4, fsdp 2) and two slices of 4 (dcn 2, data 2, fsdp 2). The 8-device run is compared with
# each of the others. It also builds the paper's xAR-H train state, shapes only.
SCRIPT = textwrap.dedent(
    """
    import json
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np
    from flax import linen as nn
    from xar_jax import sharding as sh, train_state as ts
    from xar_jax.entities import make_layout
    from xar_jax.experiment import resolve_config
    from xar_jax.model import XAR, ResolvedSettings, abstract_params, build_model
    from xar_jax.train_config import load_config_file

    layout = make_layout("cell", 8, cell_size=4)
    model = XAR(layout, 32, 1, 1, 2, 2, in_channels=1, num_classes=10, dropout=0.1,
                attn_dropout=0.1, scan_layers=True)
    tx = ts.make_optimizer(learning_rate=1e-2, b1=0.9, b2=0.96, weight_decay=0.02, clip_norm=1.0,
                           weight_decay_mask=ts.weight_decay_mask_fn(abstract_params(model)))
    rng = np.random.default_rng(0)
    batch = {"labels": rng.integers(0, 10, 16).astype(np.int32),
             "latents": rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32)}
    step = ts.make_train_step(model, layout, tx, ema_decay=0.9, label_drop_prob=0.1,
                              grad_accum_steps=2)
    rng_data = jax.random.key_data(jax.random.key(0))
    specs = ts.state_partition_specs(model, tx, rng_data)

    def run(mesh):
        shardings = sh.logical_shardings(specs, mesh)
        with jax.set_mesh(mesh), nn.logical_axis_rules(list(sh.LOGICAL_AXIS_RULES)):
            state = ts.create_train_state(model, tx, 0, shardings)
            fn = jax.jit(step, in_shardings=(shardings, sh.batch_sharding(mesh)),
                         out_shardings=(shardings, sh.replicated(mesh)), donate_argnums=(0,))
            for _ in range(2):
                state, metrics = fn(state, sh.global_batch(batch, mesh))
        return state, metrics

    def max_param_diff(a, b):
        diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))),
                             jax.device_get(a.params), jax.device_get(b.params))
        return max(jax.tree.leaves(diffs))

    single_state, single_m = run(sh.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    state, m = run(sh.make_mesh(4, 2, 1))
    two_slices = sh.make_mesh(2, 2, 1, num_slices=2)
    sliced_state, sliced_m = run(two_slices)
    kernel = state.params["encoder_blocks"]["blocks"]["attn"]["qkv"]["kernel"]
    specs_used = {str(s.spec) for s in jax.tree.leaves(sh.logical_shardings(specs, two_slices))}

    # xAR-H's whole train state (params, EMA, AdamW moments: ~4.8e9 numbers), shapes only, on
    # an 8-way fsdp mesh: what each device would hold.
    h_cfg = resolve_config(load_config_file("configs/xar_h.py"), jax.default_backend())
    h_model = build_model(h_cfg.model, make_layout("cell", 16, cell_size=8),
                          ResolvedSettings(attention_impl="xla"),  # Shapes only: any kernel.
                          in_channels=16, num_classes=1000)
    h_tx = ts.make_optimizer(learning_rate=1e-4, b1=0.9, b2=0.96, weight_decay=0.02,
                             clip_norm=1.0,
                             weight_decay_mask=ts.weight_decay_mask_fn(abstract_params(h_model)))
    h_specs = ts.state_partition_specs(h_model, h_tx, rng_data)
    h_abstract = ts.abstract_train_state(h_model, h_tx, rng_data,
                                         sh.logical_shardings(h_specs, sh.make_mesh(1, 8, 1)))
    h_total = sum(np.prod(a.shape) for a in jax.tree.leaves(h_abstract))
    h_device = sum(np.prod(a.sharding.shard_shape(a.shape)) for a in jax.tree.leaves(h_abstract))
    print("RESULT", json.dumps({
        "devices": jax.device_count(),
        "single_device": {"loss": [float(single_m["loss"]), float(m["loss"])],
                          "max_param_diff": max_param_diff(single_state, state)},
        "kernel_spec": str(kernel.sharding.spec),
        "kernel_shard_shape": list(kernel.addressable_shards[0].data.shape),
        "mu_spec": str(state.opt_state[1][0].mu["z_proj"]["kernel"].sharding.spec),
        "h_state_total": float(h_total),
        "h_state_per_device": float(h_device),
        "two_slices": {"loss": [float(m["loss"]), float(sliced_m["loss"])],
                       "max_param_diff": max_param_diff(state, sliced_state)},
        "mesh": {k: int(v) for k, v in two_slices.shape.items()},
        "slice_device_ids": [[d.id for d in s.flat] for s in two_slices.devices],
        "param_specs_with_dcn": sorted(s for s in specs_used if "dcn" in s),
        "batch_spec": str(sh.batch_sharding(two_slices).spec),
    }))
    """
)


@pytest.fixture(scope="module")
def result() -> dict:
    """The JSON that SCRIPT prints, run in a fresh Python (8 CPU devices)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["XLA_FLAGS"] = FAST_COMPILE_FLAGS  # The runs are compared with each other only.
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def test_sharded_step_matches_single_device_step(result):
    r = result
    assert r["devices"] == 8
    single_loss, sharded_loss = r["single_device"]["loss"]
    assert abs(single_loss - sharded_loss) <= 1e-5 * abs(single_loss)
    # Two AdamW steps at lr 1e-2 move params by up to ~2e-2. Adam's first steps act like
    # lr * sign(g), which magnifies summation-order noise where |g| is tiny: allow 1% of lr.
    assert r["single_device"]["max_param_diff"] < 1e-4
    # Params and optimizer moments are really sharded along the width over fsdp (never whole).
    assert "fsdp" in r["kernel_spec"], r["kernel_spec"]
    assert r["kernel_shard_shape"] == [1, 16, 96]
    assert "fsdp" in r["mu_spec"], r["mu_spec"]
    # The paper's xAR-H state is split ~8 ways (only tiny vectors stay replicated).
    assert r["h_state_total"] > 4.7e9
    assert r["h_state_per_device"] < 1.01 * r["h_state_total"] / 8


def test_two_slices_of_four_train_the_same_params_as_one_slice_of_eight(result):
    """The dcn axis (mesh.num_slices) is data parallel: 2 x (data 2, fsdp 2) == 1 x (4, 2).

    CPU devices have no slice_index, so make_mesh's fallback takes consecutive groups of
    devices as slices; that path is what runs here.
    """
    r = result
    assert r["mesh"] == {"dcn": 2, "data": 2, "fsdp": 2, "tensor": 1}
    assert r["slice_device_ids"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert r["batch_spec"] == "P(('dcn', 'data', 'fsdp'),)"
    assert r["param_specs_with_dcn"] == []  # Params and optimizer state replicated per slice.
    ref_loss, loss = r["two_slices"]["loss"]
    assert abs(ref_loss - loss) <= 1e-5 * abs(ref_loss)
    assert r["two_slices"]["max_param_diff"] < 1e-4  # As above: summation-order noise.
