"""Checkpoint converters: the authors' PyTorch weights to our Flax params (and back for xAR).

Command line: ``python -m xar_jax.convert {xar,vae,inception} --src FILE --out DIR``.
"""
