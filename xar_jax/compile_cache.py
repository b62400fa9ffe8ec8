"""JAX's persistent compilation cache, turned on the same way by every command that compiles.

A restarted run (a resume, a repeated evaluation, a benchmark after the trainer) then loads its
programs instead of compiling them again: ``config.compile_cache_dir`` names the directory (local
or gs://, through etils.epath), '' means ``WORKDIR/compile_cache`` and 'none' turns it off.
"""

from __future__ import annotations

import os

import jax

from xar_jax import fileio


def cache_path(config, workdir: str | None = None) -> str | None:
    """Where ``config.compile_cache_dir`` puts the cache; None when it is 'none', or '' without a
    ``workdir``."""
    value = config.compile_cache_dir
    if value == "none" or (not value and not workdir):
        return None
    if not value:
        value = os.path.join(workdir, "compile_cache")
    return value if fileio.is_remote(value) else os.path.abspath(value)


def enable(config, workdir: str | None = None) -> str | None:
    """Turns the cache on (before anything compiles) at `cache_path`. Returns its path, or None.

    JAX creates the directory at the first compilation.
    """
    path = cache_path(config, workdir)
    if path is None:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs", float(config.compile_cache_min_compile_secs)
    )
    # -1: no size floor (JAX's 0 lets it pick one per filesystem); small programs count too.
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path
