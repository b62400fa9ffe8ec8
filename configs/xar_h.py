"""xAR-H (1186.02M params) on ImageNet 256 with the paper's recipe.

Every field and the recipe's values: xar_jax/train_config.py (base_config, paper_config).

  python -m xar_jax.main --config=configs/xar_h.py --workdir=$WORKDIR \
      --config.data.cache_dir=$LATENT_CACHE
"""

from xar_jax.train_config import paper_config


def get_config():
    return paper_config("xar_h", sample_steps=50, cfg_scale=2.2)
