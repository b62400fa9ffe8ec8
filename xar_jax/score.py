"""``--mode=eval``: sample, score, and record the result in the workdir's evaluation history.

Digits: class accuracy and Fréchet distance (`digits_quality`); ImageNet: FID and Inception Score
against ``eval.reference_stats``. Each evaluation writes ``metrics.json`` beside its samples,
appends a record to ``workdir/eval.json`` (a list, oldest first: evaluating the same step twice
gives two records) and writes TensorBoard scalars ``eval/<metric>`` at the params' step. Every
file is replaced atomically, so an evaluation can be repeated in the same workdir at will.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from typing import Any

import jax
import numpy as np

from xar_jax import experiment as experiment_lib
from xar_jax import fileio, generate
from xar_jax import metrics as metrics_lib
from xar_jax.evaluation import fid
from xar_jax.evaluation.digits_score import digits_quality
from xar_jax.evaluation.evaluate import evaluate_images, load_inception
from xar_jax.evaluation.image_sources import NpzImages

log = logging.getLogger("xar_jax.score")

METRICS_FILE = "metrics.json"
EVAL_HISTORY_FILE = "eval.json"
PAPER_NUM_IMAGES = 50_000  # FID below this many samples is biased upwards: not the paper's number.


def read_npz(path: str, key: str) -> np.ndarray:
    with fileio.as_path(path).open("rb") as f, np.load(f) as data:
        return data[key]


def score_digits(path: str) -> dict[str, float]:
    """Class accuracy and Fréchet distance of an ADM-format digits ``samples.npz``."""
    images = read_npz(path, "arr_0").astype(np.float32) / 127.5 - 1.0
    return {k: float(v) for k, v in digits_quality(images, read_npz(path, "labels")).items()}


def load_reference(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` from a statistics ``.npz`` at a local path or gs:// URL."""
    if "://" not in path:
        return fid.load_reference_stats(path)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "reference.npz")
        with open(local, "wb") as f:
            f.write(fileio.as_path(path).read_bytes())
        return fid.load_reference_stats(local)


def open_scorer(config) -> tuple[Any, tuple[np.ndarray, np.ndarray]]:
    """``(Inception params, (mu, sigma))`` of the config: both read and checked now, before any
    sampling, so a damaged file is named in a line instead of after hours of sampling.

    Raises:
      MissingInputError / CorruptInputError naming the file.
    """
    reference = load_reference(config.eval.reference_stats)
    return load_inception(config.eval.inception_checkpoint), reference


def score_imagenet(config, path: str, scorer=None) -> dict[str, float]:
    """FID and Inception Score of ``samples.npz`` (all processes take part).

    ``scorer``: `open_scorer`'s result if already opened.
    """
    params, reference = scorer or open_scorer(config)
    metrics = evaluate_images(params, NpzImages(path), reference, batch_size=config.eval.batch_size)
    return {k: float(v) for k, v in metrics.items()}


def read_history(workdir: str) -> list[dict[str, Any]]:
    """Every evaluation recorded in ``workdir/eval.json``, oldest first ([] if none)."""
    path = fileio.as_path(workdir) / EVAL_HISTORY_FILE
    if not path.exists():
        return []
    history = fileio.read_json(path)
    return history if isinstance(history, list) else [history]  # An older single record.


def evaluate(exp: experiment_lib.Experiment, workdir: str) -> dict[str, float]:
    """Samples ``eval.num_images`` (resumable), decodes, scores and records them.

    Returns:
      The metrics: ``class_accuracy``, ``frechet_distance`` (digits) or ``fid``,
      ``inception_score``, ``inception_score_std``, ``num_images`` (ImageNet).
    """
    config = exp.config
    generate.check_inputs(config, workdir, scoring=True)
    scorer = None if config.data.source == "digits" else open_scorer(config)
    samples = generate.generate_samples(exp, workdir, num_images=config.eval.num_images)
    path = generate.local_copy(samples)  # Every process reads its share from its local disk.
    note = {}
    if config.data.source == "digits":
        metrics = score_digits(path)
    else:
        metrics = score_imagenet(config, path, scorer)
        if config.eval.num_images < PAPER_NUM_IMAGES:
            note = {
                "note": f"FID of {config.eval.num_images:,} images: not comparable to the "
                f"paper below {PAPER_NUM_IMAGES:,} (fewer images give a higher FID)."
            }
            log.warning("%s", note["note"])
    settings = samples.settings
    step = settings.checkpoint_step
    if jax.process_index() == 0:
        record = {
            **metrics,
            **note,
            "step": step,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "samples": samples.published,
            "settings": dataclasses.asdict(settings),
        }
        fileio.write_json(os.path.join(os.path.dirname(samples.published), METRICS_FILE), record)
        history_path = fileio.write_json(
            fileio.as_path(workdir) / EVAL_HISTORY_FILE, [*read_history(workdir), record]
        )
        writer = metrics_lib.create_writer(workdir, is_main_process=True)
        writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
        writer.close()
        log.info(
            "Wrote %s and %s.",
            os.path.join(os.path.dirname(samples.published), METRICS_FILE),
            history_path,
        )
    log.info("Eval of %s: %s", settings.dir_name(), metrics)
    return metrics
