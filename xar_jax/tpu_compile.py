"""What a compile-only TPU program is: the trainer's step or the sampler, for an abstract slice.

Compiling needs libtpu, not a TPU: `topology_devices` describes the slice to libtpu, and
`compile_train` / `compile_sample` compile exactly what the trainer and `xar_jax.generate` run.
Everything here shapes the compiled program (or reads what the compiler decided: memory, its own
cost analysis), so its source is part of the planner's compile-cache key (`xar_jax.plan`);
what is read from the program's text afterwards (`xar_jax.hlo_report`) is not.
"""

from __future__ import annotations

import os
from importlib import metadata

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

from xar_jax import experiment, generate, sampling, tpu_topology, train
from xar_jax import sharding as sharding_lib

GIB = 2**30
# What the compiler says when a program does not fit in HBM.
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Ran out of memory", "out of memory", "exceeds the memory")


def quiet_libtpu(topo: tpu_topology.Topology | None = None) -> None:
    """Environment for a compile-only libtpu on a machine without TPUs (defaults only: a TPU
    VM's own values win).

    No metadata-server lookup (not a Cloud VM), and no exclusive /tmp/libtpu_lockfile: any JAX
    process on the machine may hold it once libtpu is installed, and compiling needs no chip.
    The worker list and accelerator type the metadata server would give (one local host;
    ``topo``'s Cloud name), without which libtpu logs an INVALID_ARGUMENT error as it loads.
    """
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    if topo is not None:
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type(topo))


def accelerator_type(topo: tpu_topology.Topology) -> str:
    """The Cloud accelerator type of ``topo`` ('v5litepod-4', 'v5p-8': v4 and v5p count cores)."""
    gen = topo.generation
    family = "v5litepod" if gen.name == "v5e" else gen.name
    return f"{family}-{2 * topo.chips if gen.counts_cores else topo.chips}"


def topology_devices(topo: tpu_topology.Topology, num_slices: int) -> list:
    """Abstract (compile-only) devices of ``num_slices`` copies of ``topo``."""
    quiet_libtpu(topo)

    return list(topologies.get_topology_desc(**topo.describe(num_slices)).devices)


def libtpu_version() -> str:
    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return "not installed"


def compile_train(config, devices):
    """``(compiled, mesh)`` of the trainer's jitted step for ``devices``."""

    exp = experiment.build(config, "train", devices=devices)
    setup = experiment.training_setup(exp)
    with jax.set_mesh(exp.mesh), exp.rules_context():
        lowered = train.lower_train_step(
            train.jit_train_step(exp, setup),
            setup.abstract_state,
            train.train_batch_spec(config, exp.mesh),
        )
        return lowered.compile(), exp.mesh


def compile_sample(config, devices):
    """``(compiled, mesh)`` of the sampler on one host's chips (as `generate` runs it)."""

    exp = experiment.build(config, "sample", devices=devices)
    local = [d for d in devices if d.process_index == devices[0].process_index]
    hosts = len(devices) // len(local)
    batch = generate.per_process_batch(config, hosts, len(local))
    mesh = sharding_lib.make_mesh(-1, 1, 1, devices=local)
    replicated = NamedSharding(mesh, PartitionSpec())
    s = config.sample
    fn = sampling.make_sampler(
        exp.model,
        num_steps=s.num_steps,
        cfg=float(s.cfg),
        sampler=s.sampler,
        cfg_schedule=s.cfg_schedule,
    )
    params = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), exp.abstract_params
    )
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding_lib.batch_sharding(mesh))
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    with jax.set_mesh(mesh), exp.rules_context():
        return fn.lower(params, labels, key, None).compile(), mesh


def hbm_per_chip(compiled) -> dict[str, float]:
    m = compiled.memory_analysis()
    parts = {
        "arguments": m.argument_size_in_bytes,
        "temporaries": m.temp_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
        "code": m.generated_code_size_in_bytes,
    }
    total = (
        parts["arguments"]
        + parts["outputs"]
        - parts["aliased"]
        + parts["temporaries"]
        + parts["code"]
    )
    out = {k: round(v / GIB, 3) for k, v in parts.items()}
    out["total"] = round(total / GIB, 3)
    return out


def cost(compiled) -> dict[str, float]:
    """Per-chip FLOPs, HBM bytes and the compiler's optimal_seconds (while bodies counted once)."""
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return {
        "flops": float(ca.get("flops", 0.0)),
        "bytes": float(ca.get("bytes accessed", 0.0)),
        "optimal_seconds": float(ca.get("optimal_seconds", float("nan"))),
    }
