"""Evaluation: Flax InceptionV3 (torch-fidelity compat), FID / IS, sample writing, digits score."""
