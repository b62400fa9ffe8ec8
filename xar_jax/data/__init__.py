"""Input pipelines: the embedded digits, TFDS ImageNet and cached VAE latents."""
