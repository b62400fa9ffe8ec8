"""A small xAR on the embedded 8x8 digits: trains on 2 CPU cores in minutes, no downloads.

  python -m xar_jax.main --config=configs/demo.py --workdir=/tmp/xar_demo

Every field: xar_jax/train_config.py (base_config). The digits are their own latents (no VAE);
entities are 4x4 cells of the 8x8 grid (4 steps, like the paper's 8x8 cells on 16x16).
"""

from xar_jax.train_config import base_config


def get_config():
    c = base_config()  # Data: embedded digits, 'train' split (1,437 images, 10 classes).
    c.latent.tokenizer = "identity"
    c.latent.grid_size = 8
    c.latent.channels = 1
    c.latent.num_classes = 10
    c.entity.kind = "cell"
    c.entity.cell_size = 4
    c.model.width = 128
    c.model.encoder_depth = 2
    c.model.decoder_depth = 2
    c.model.num_heads = 4
    c.model.dropout = 0.0  # Tiny model, short run: regularisation only slows it down.
    c.model.attn_dropout = 0.0
    c.train.global_batch_size = 32
    c.train.num_epochs = 23.0  # 44 steps per epoch: 1012 steps.
    c.optim.lr = 1e-3
    c.optim.end_lr = 1e-4
    c.optim.warmup_epochs = 1.0
    c.optim.decay_start_epoch = 12.0
    c.optim.weight_decay = 0.0
    c.optim.ema_decay = 0.99  # A short run: the EMA must forget the early params.
    c.checkpoint.every_steps = 250
    c.checkpoint.max_to_keep = 2
    c.checkpoint.keep_period = 0
    c.log.every_steps = 100
    c.log.sample_every_steps = 500
    c.log.num_samples = 40
    c.sample.num_steps = 20
    c.sample.cfg = 2.0
    c.sample.num_images = 100
    c.sample.batch_size = 100
    c.sample.format = "grid"  # --mode=sample: the README's grid; --mode=eval samples 'adm'.
    c.eval.num_images = 1000  # 100 per class, scored by digits_quality.
    return c
