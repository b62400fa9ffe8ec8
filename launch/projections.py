"""Projected dollars of training and evaluating xAR on Cloud TPU, from FLOP counts.

Prints the cost tables of docs/tpu.md: what a compiler cannot tell. Per-chip memory, the mesh and
batch that fit, and step-time estimates come from compiling the real step for the slice
(``python -m xar_jax.aot``, docs/tpu_aot.json); this script's earlier memory projections are
gone, and its throughput (an ASSUMED model-FLOPs utilisation) is superseded by those estimates
and, finally, by measurements on a slice (launch/time_to_train.py writes the planner's table of
hours per slice with these prices). Replace TRAIN_MFU with a measured value when you have one.

    python launch/projections.py            # markdown tables
"""

from __future__ import annotations

import dataclasses
import math

# ---- the model (arXiv 2502.20388 and the authors' release) ---------------------------------
TOKENS = 256  # 16x16 latent grid, one token per position
CELLS = 4  # 8x8 cells: adaLN conditioning is computed once per cell, not per token
LATENT_CHANNELS = 16
NUM_CLASSES = 1000  # + 1 null class


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    width: int
    blocks: int  # encoder + decoder blocks
    sample_steps: int  # published sampling steps (ImageNet 256)
    published_params_m: float


MODELS = (
    Model("xAR-B", 768, 16, 40, 172.64),
    Model("xAR-L", 1024, 32, 50, 608.40),
    Model("xAR-H", 1280, 40, 50, 1186.02),
)


def param_counts(m: Model) -> dict[str, int]:
    """Parameters by how often they are applied: per token, per cell (adaLN), or as lookups."""
    d = m.width
    hidden = int(d * 4 * 2 / 3)
    attn = 3 * d * d + 3 * d + d * d + d
    mlp = 2 * (d * hidden + hidden) + hidden * d + d
    ada = 6 * d * d + 6 * d
    per_token = m.blocks * (attn + mlp) + (LATENT_CHANNELS * d + d) + (d * d + d)
    per_token += d * LATENT_CHANNELS + LATENT_CHANNELS  # z_proj, decoder_embed, pred
    per_cell = m.blocks * ada + (256 * d + d + d * d + d)  # adaLN + timestep MLP
    lookup = (NUM_CLASSES + 1) * d + 2 * TOKENS * d + 3 * d  # embeddings, norm weights
    return {"per_token": per_token, "per_cell": per_cell, "lookup": lookup}


def train_flops_per_image(m: Model) -> float:
    """Forward + backward (3 x 2 FLOPs per multiply-add) of one 256-token image."""
    p = param_counts(m)
    matmul = 6 * (p["per_token"] * TOKENS + p["per_cell"] * CELLS)
    # Dense attention scores and mixing (the block-causal mask is applied, not exploited).
    attention = 3 * m.blocks * 2 * 2 * TOKENS * TOKENS * m.width
    return matmul + attention


def sample_flops_per_image(m: Model, cfg: bool = True) -> float:
    """Forward FLOPs to generate one image with a KV cache: per cell, `steps` forwards of its
    64 tokens attending to the cached context, then one pass that caches it (guidance doubles
    the batch)."""
    p = param_counts(m)
    cell_tokens = TOKENS // CELLS
    total = 0.0
    for cell in range(CELLS):
        context = cell_tokens * (cell + 1)
        per_pass = 2 * (p["per_token"] * cell_tokens + p["per_cell"])
        per_pass += m.blocks * 2 * 2 * cell_tokens * context * m.width
        total += (m.sample_steps + 1) * per_pass
    return total * (2 if cfg else 1)


# ---- MAR's KL-16 VAE (convolutions and attention; norms and activations ignored) ----------
VAE_CH, VAE_MULT, VAE_RES_BLOCKS, IMAGE_SIZE = 128, (1, 1, 2, 2, 4), 2, 256


def _conv(k: int, cin: int, cout: int, hw: int) -> float:
    return 2.0 * k * k * cin * cout * hw * hw


def _attention(c: int, hw: int) -> float:  # q, k, v, proj 1x1 convs + scores + mixing
    return 4 * _conv(1, c, c, hw) + 2 * 2.0 * (hw * hw) ** 2 * c


def _resblock(cin: int, cout: int, hw: int) -> float:
    shortcut = _conv(1, cin, cout, hw) if cin != cout else 0.0
    return _conv(3, cin, cout, hw) + _conv(3, cout, cout, hw) + shortcut


def vae_encoder_flops_per_image() -> float:
    """Encoder forward: levels of 2 res blocks, attention at 16x16, stride-2 downsampling."""
    hw, cin = IMAGE_SIZE, VAE_CH
    total = _conv(3, 3, VAE_CH, hw)
    for level, m in enumerate(VAE_MULT):
        cout = VAE_CH * m
        for _ in range(VAE_RES_BLOCKS):
            total += _resblock(cin, cout, hw) + (_attention(cout, hw) if hw == 16 else 0.0)
            cin = cout
        if level < len(VAE_MULT) - 1:
            hw //= 2
            total += _conv(3, cout, cout, hw)
    total += 2 * _resblock(cin, cin, hw) + _attention(cin, hw)  # middle
    total += _conv(3, cin, 2 * LATENT_CHANNELS, hw) + _conv(1, 32, 32, hw)  # out, quant_conv
    return total


def vae_decoder_flops_per_image() -> float:
    """Decoder forward: the mirror image with 3 res blocks per level and nearest upsampling
    followed by a 3x3 conv."""
    hw = IMAGE_SIZE // 2 ** (len(VAE_MULT) - 1)
    cin = VAE_CH * VAE_MULT[-1]
    total = _conv(1, LATENT_CHANNELS, LATENT_CHANNELS, hw) + _conv(3, LATENT_CHANNELS, cin, hw)
    total += 2 * _resblock(cin, cin, hw) + _attention(cin, hw)  # middle
    for level in reversed(range(len(VAE_MULT))):
        cout = VAE_CH * VAE_MULT[level]
        for _ in range(VAE_RES_BLOCKS + 1):
            total += _resblock(cin, cout, hw) + (_attention(cout, hw) if hw == 16 else 0.0)
            cin = cout
        if level > 0:
            hw *= 2
            total += _conv(3, cout, cout, hw)
    return total + _conv(3, cin, 3, hw)


# ---- the hardware and the assumptions ------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_bf16_tflops: float
    usd_per_chip_hour: float  # ASSUMED on-demand list price, see PRICE_NOTE


CHIPS = (
    Chip("v4", 275.0, 3.22),
    Chip("v5e", 197.0, 1.20),
    Chip("v5p", 459.0, 4.20),
    Chip("v6e", 918.0, 2.70),
)
PRICE_NOTE = (
    "ASSUMED on-demand list prices per chip-hour in US regions (v4 $3.22, v5e $1.20, v5p $4.20, "
    "v6e $2.70), "
    "as recalled from Google's public TPU pricing page in 2025 and not re-checked; spot assumed "
    "60% cheaper. Check https://cloud.google.com/tpu/pricing before planning: prices change and "
    "differ by region."
)
SPOT_DISCOUNT = 0.60
TRAIN_MFU = 0.40  # ASSUMED model-FLOPs utilisation of the training step
SAMPLE_MFU = 0.25  # ASSUMED: 64-token steps with a KV cache keep the chips less busy
EPOCHS = 800
IMAGENET_TRAIN = 1_281_167
FID_SAMPLES = 50_000


def _fmt(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def model_table() -> str:
    rows = [
        "| model | params (M) | train GFLOP / image | 6·N·T GFLOP | train EFLOP, 800 ep | "
        "sample GFLOP / image |",
        "|---|---|---|---|---|---|",
    ]
    for m in MODELS:
        p = param_counts(m)
        n = sum(p.values())
        rows.append(
            f"| {m.name} | {n / 1e6:.2f} | {_fmt(train_flops_per_image(m) / 1e9)} | "
            f"{_fmt(6 * n * TOKENS / 1e9)} | "
            f"{_fmt(train_flops_per_image(m) * EPOCHS * IMAGENET_TRAIN / 1e18)} | "
            f"{_fmt(sample_flops_per_image(m) / 1e9)} |"
        )
    return "\n".join(rows)


def slice_name(chip: Chip, chips: int) -> str:
    """Accelerator type for a chip count: v4 and v5p types count TensorCores (2 per chip)."""
    return f"{chip.name}-{2 * chips if chip.name in ('v4', 'v5p') else chips}"


def training_table() -> str:
    """Chip-hours at the assumed MFU; the planner's table (launch/time_to_train.py) has the
    compiled estimates per slice."""
    total_images = EPOCHS * IMAGENET_TRAIN
    rows = [
        "| model | chip | img/s per chip | chip-hours | on-demand $ | spot $ |",
        "|---|---|---|---|---|---|",
    ]
    for m in MODELS:
        for chip in CHIPS:
            rate = chip.peak_bf16_tflops * 1e12 * TRAIN_MFU / train_flops_per_image(m)
            chip_hours = total_images / rate / 3600
            cost = chip_hours * chip.usd_per_chip_hour
            rows.append(
                f"| {m.name} | {chip.name} | {rate:,.0f} | {_fmt(chip_hours)} | "
                f"{_fmt(cost)} | {_fmt(cost * (1 - SPOT_DISCOUNT))} |"
            )
    return "\n".join(rows)


def caching_table() -> str:
    """Encoding ImageNet (each image and its flip) once for the latent cache."""
    flops = vae_encoder_flops_per_image() * 2 * IMAGENET_TRAIN
    rows = [
        f"VAE encoder: {vae_encoder_flops_per_image() / 1e9:.0f} GFLOP per image; the cache "
        f"encodes {IMAGENET_TRAIN:,} images and their flips ({flops / 1e18:.2f} EFLOP).",
        "",
        "| chip | chip-hours | on-demand $ |",
        "|---|---|---|",
    ]
    for chip in CHIPS:
        chip_hours = flops / (chip.peak_bf16_tflops * 1e12 * SAMPLE_MFU) / 3600
        cost = _fmt(chip_hours * chip.usd_per_chip_hour)
        rows.append(f"| {chip.name} | {chip_hours:.1f} | {cost} |")
    return "\n".join(rows)


def eval_table() -> str:
    """Sampling 50,000 images with guidance, then decoding them with the VAE."""
    rows = [
        "| model | chip | chip-hours for 50k images | on-demand $ | VAE decoding share |",
        "|---|---|---|---|---|",
    ]
    decode = vae_decoder_flops_per_image()
    for m in MODELS:
        for chip in CHIPS:
            flops = (sample_flops_per_image(m) + decode) * FID_SAMPLES
            chip_hours = flops / (chip.peak_bf16_tflops * 1e12 * SAMPLE_MFU) / 3600
            rows.append(
                f"| {m.name} | {chip.name} | {chip_hours:.1f} | "
                f"{_fmt(chip_hours * chip.usd_per_chip_hour, 0)} | "
                f"{decode / (sample_flops_per_image(m) + decode):.1%} |"
            )
    return "\n".join(rows)


def check_param_counts() -> None:
    """The architecture formulas must reproduce the published sizes (arXiv 2502.20388)."""
    for m in MODELS:
        n = sum(param_counts(m).values()) / 1e6
        if not math.isclose(n, m.published_params_m, rel_tol=1e-3):
            published = m.published_params_m
            raise AssertionError(f"{m.name}: {n:.2f}M parameters, published {published}M")


def main() -> None:
    check_param_counts()
    print("## Model FLOPs\n")
    print(model_table())
    print("\n## Training, 800 epochs of ImageNet (projection)\n")
    print(training_table())
    print("\n## Latent caching (projection)\n")
    print(caching_table())
    print("\n## FID evaluation: sampling 50,000 images (projection)\n")
    print(eval_table())
    print(
        f"\nAssumptions: training MFU {TRAIN_MFU:.0%}, sampling MFU {SAMPLE_MFU:.0%}, "
        f"{EPOCHS} epochs x {IMAGENET_TRAIN:,} images; prices: {PRICE_NOTE}"
    )


if __name__ == "__main__":
    main()
