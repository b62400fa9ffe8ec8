"""A seconds-long smoke run on the embedded digits (tests, CI, laptops checking an install).

python -m xar_jax.main --config=configs/tiny.py --workdir=/tmp/xar_tiny
"""

from xar_jax.train_config import base_config


def get_config():
    c = base_config()
    c.latent.grid_size = 8
    c.latent.channels = 1
    c.latent.num_classes = 10
    c.entity.kind = "cell"
    c.entity.cell_size = 4
    c.model.width = 32
    c.model.encoder_depth = 1
    c.model.decoder_depth = 1
    c.model.num_heads = 2
    c.model.scan_layers = True
    c.model.dropout = 0.1
    c.model.attn_dropout = 0.1
    c.train.global_batch_size = 8
    c.train.num_epochs = 1.0
    c.train.num_steps = 12
    c.optim.lr = 1e-3
    c.optim.warmup_epochs = 0.0
    c.optim.decay_start_epoch = 1.0
    c.optim.ema_decay = 0.9
    c.checkpoint.every_steps = 4
    c.checkpoint.max_to_keep = 5
    c.checkpoint.keep_period = 0
    c.log.every_steps = 1
    c.log.sample_every_steps = 0
    c.log.num_samples = 10
    c.sample.num_steps = 2
    c.sample.num_images = 20
    c.sample.batch_size = 20
    c.sample.format = "grid"
    c.eval.num_images = 20
    return c
