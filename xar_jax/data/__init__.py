"""Input pipelines: the embedded digits, TFDS ImageNet and cached VAE latents (docs/data.md).

Modules: ``config`` (the data config and its checks), ``pipeline`` (Grain train/eval iterators),
``sources`` (readers per source, corrupt-record policy), ``digits``, ``imagenet`` (TFDS source, ADM
crop), ``latent_cache`` (caching run and CLI), ``latent_format`` (on-disk format and reader),
``latents`` (sampling z from moments), ``device`` (global arrays, device prefetch).
"""
