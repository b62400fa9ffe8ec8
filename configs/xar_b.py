"""xAR-B (172.64M params) on ImageNet 256 with the paper's recipe.

Every field and the recipe's values: xar_jax/train_config.py (base_config, paper_config).

  python -m xar_jax.main --config=configs/xar_b.py --workdir=$WORKDIR \
      --config.data.cache_dir=$LATENT_CACHE
"""

from xar_jax.train_config import paper_config


def get_config():
    return paper_config("xar_b", sample_steps=40, cfg_scale=2.7)
