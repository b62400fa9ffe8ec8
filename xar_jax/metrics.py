"""Training metrics: a TensorBoard writer without TensorFlow, console lines, throughput and ETA.

``clu.metric_writers`` imports TensorFlow at import time (clu 0.0.12), so `TensorBoardWriter`
implements the same writer interface (write_scalars / write_images / write_texts / write_hparams /
flush / close) on ``tensorboardX`` (numpy + protobuf). `MultiWriter` fans out to several writers;
only process 0 writes (`create_writer` returns a no-op writer elsewhere).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from clu import metrics as clu_metrics

log = logging.getLogger("xar_jax.train")


class NullWriter:
    """Writes nothing (processes other than 0)."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None: ...
    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None: ...
    def write_texts(self, step: int, texts: Mapping[str, str]) -> None: ...
    def write_hparams(self, hparams: Mapping[str, Any]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def _register_gcs_event_files() -> None:
    """Makes tensorboardX's ``gs://`` event files upload only when they changed.

    tensorboardX (2.6) writes a ``gs://`` event file by re-uploading the whole file on every
    flush, and once more from ``__del__`` after ``close``: at interpreter exit that last upload
    retries for 120 s when the storage endpoint is gone (an emulator stopped first), and
    uploads unchanged bytes otherwise. The replacement skips uploads of unchanged files.
    """
    from tensorboardX import record_writer

    if not record_writer.GCS_ENABLED:
        return  # tensorboardX itself explains that google-cloud-storage is needed

    class _GcsEventFile(record_writer.GCSRecordWriter):
        _uploaded = -1  # buffer size at the last upload

        def flush(self):
            if self.buffer.tell() != self._uploaded:
                super().flush()
                self._uploaded = self.buffer.tell()

    class _Factory(record_writer.GCSRecordWriterFactory):
        def open(self, path):
            return _GcsEventFile(path)

    record_writer.register_writer_factory("gs", _Factory())


class TensorBoardWriter(NullWriter):
    """TensorBoard event files in ``logdir`` (local or ``gs://``) via tensorboardX (no TF)."""

    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter

        if logdir.startswith("gs://"):
            _register_gcs_event_files()
        self._writer = SummaryWriter(logdir=logdir)

    def write_scalars(self, step, scalars):
        for name, value in scalars.items():
            self._writer.add_scalar(name, float(np.asarray(value)), global_step=int(step))

    def write_images(self, step, images):
        """Images (N, H, W, C) or (H, W, C), float in [0, 1] or uint8."""
        for name, image in images.items():
            image = np.asarray(image)
            if image.dtype != np.uint8:
                image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
            if image.ndim == 3:
                image = image[None]
            self._writer.add_images(name, image, global_step=int(step), dataformats="NHWC")

    def write_texts(self, step, texts):
        for name, text in texts.items():
            self._writer.add_text(name, text, global_step=int(step))

    def write_hparams(self, hparams):
        self._writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in hparams.items()))

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


class ConsoleWriter(NullWriter):
    """Scalars as one log line per step: ``step 100 | loss 0.512 | grad_norm 1.2 | ...``;
    ``eta_seconds`` reads ``ETA 1h02m03s``."""

    def write_scalars(self, step, scalars):
        parts = [
            f"ETA {format_eta(v)}" if k == "eta_seconds" else f"{k} {_format(v)}"
            for k, v in scalars.items()
        ]
        log.info("step %d | %s", int(step), " | ".join(parts))


class MultiWriter(NullWriter):
    def __init__(self, writers: Sequence[NullWriter]):
        self._writers = list(writers)

    def write_scalars(self, step, scalars):
        for w in self._writers:
            w.write_scalars(step, scalars)

    def write_images(self, step, images):
        for w in self._writers:
            w.write_images(step, images)

    def write_texts(self, step, texts):
        for w in self._writers:
            w.write_texts(step, texts)

    def write_hparams(self, hparams):
        for w in self._writers:
            w.write_hparams(hparams)

    def flush(self):
        for w in self._writers:
            w.flush()

    def close(self):
        for w in self._writers:
            w.close()


def _format(value) -> str:
    value = float(np.asarray(value))
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4g}"
    return f"{value:.3e}"


def create_writer(logdir: str, *, is_main_process: bool) -> NullWriter:
    """Console + TensorBoard on process 0; a no-op writer elsewhere."""
    if not is_main_process:
        return NullWriter()
    return MultiWriter([ConsoleWriter(), TensorBoardWriter(logdir)])


def module_totals(params: Any, limit: int = 6) -> str:
    """``'encoder_blocks 23,040 | decoder_blocks 23,040 | ... | 5 more 1,234'``: parameter counts
    per top-level module of a params tree (arrays or ShapeDtypeStructs), largest first."""
    totals = {
        name: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(sub))
        for name, sub in params.items()
    }
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    parts = [f"{name} {count:,}" for name, count in ranked[:limit]]
    rest = ranked[limit:]
    if rest:
        parts.append(f"{len(rest)} more {sum(c for _, c in rest):,}")
    return " | ".join(parts)


def format_eta(seconds: float) -> str:
    seconds = float(np.asarray(seconds))
    if not np.isfinite(seconds):
        return "unknown"
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Throughput:
    """Steps/s, images/s/device and ETA between successive `report` calls (wall clock)."""

    def __init__(
        self, *, start_step: int, total_steps: int, global_batch_size: int, num_devices: int
    ):
        self.total_steps = total_steps
        self.batch = global_batch_size
        self.devices = num_devices
        self._step = start_step
        self._time = time.perf_counter()

    def measurable(self, step: int) -> bool:
        """Whether steps were taken since the previous report (else there is no rate yet)."""
        return step > self._step

    def report(self, step: int) -> dict[str, float]:
        """Rates since the previous report (or construction) and the ETA to ``total_steps``."""
        now = time.perf_counter()
        elapsed = max(now - self._time, 1e-9)
        steps_per_sec = (step - self._step) / elapsed
        self._step, self._time = step, now
        remaining = (self.total_steps - step) / steps_per_sec if steps_per_sec > 0 else float("inf")
        return {
            "steps_per_sec": steps_per_sec,
            "images_per_sec_per_device": steps_per_sec * self.batch / self.devices,
            "eta_seconds": remaining,
        }


# ----------------------------------------------------------------------------------------------
# Interval means, on device.
def _scalars(step_metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The averaged metrics of one step: loss, grad_norm and each entity's loss as scalars."""
    out = {"loss": step_metrics["loss"], "grad_norm": step_metrics["grad_norm"]}
    for i in range(step_metrics["loss_per_entity"].shape[0]):
        out[f"loss_entity_{i}"] = step_metrics["loss_per_entity"][i]
    return out


class IntervalMeans:
    """Means of the step metrics over a log interval, accumulated on device.

    `add` merges each step's metrics into a `clu.metrics` collection of averages inside a small
    jitted function: no host synchronisation per step. `result` reads the means (one transfer)
    and starts a new interval.
    """

    def __init__(self, num_entities: int):
        names = ("loss", "grad_norm", *[f"loss_entity_{i}" for i in range(num_entities)])
        self._collection = clu_metrics.Collection.create(
            **{name: clu_metrics.Average.from_output(name) for name in names}
        )
        collection = self._collection
        self._first = jax.jit(lambda m: collection.single_from_model_output(**_scalars(m)))
        self._merge = jax.jit(
            lambda acc, m: acc.merge(collection.single_from_model_output(**_scalars(m)))
        )
        self._acc = None

    def add(self, step_metrics: Mapping[str, Any]) -> None:
        self._acc = (
            self._first(step_metrics) if self._acc is None else self._merge(self._acc, step_metrics)
        )

    def result(self) -> dict[str, float]:
        """``{name: mean over the steps added since the last result}``; resets."""
        if self._acc is None:
            return {}
        means = jax.device_get(self._acc.compute())
        self._acc = None
        return {k: float(v) for k, v in means.items()}


def memory_summary(compiled: Any) -> str:
    """A compiled program's memory per device, from XLA's own analysis (GiB)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return "not reported on this backend"
    gib = 1024.0**3
    fields = {
        "arguments": analysis.argument_size_in_bytes,
        "outputs": analysis.output_size_in_bytes,
        "aliased": analysis.alias_size_in_bytes,
        "temporaries": analysis.temp_size_in_bytes,
        "generated code": analysis.generated_code_size_in_bytes,
    }
    total = fields["arguments"] + fields["outputs"] - fields["aliased"] + fields["temporaries"]
    parts = ", ".join(f"{k} {v / gib:.3f} GiB" for k, v in fields.items())
    return f"{parts}; peak about {total / gib:.3f} GiB"


class ProfilerWindow:
    """A `jax.profiler` trace of steps ``start .. start + num - 1`` into ``workdir`` (TensorBoard's
    profile plugin reads ``workdir/plugins/profile``). ``start`` 0 turns it off."""

    def __init__(self, workdir: str, start: int, num: int):
        self._dir, self._start, self._end = workdir, start, start + num - 1
        self._active = False

    def before_step(self, step: int) -> None:
        if self._start > 0 and step == self._start and not self._active:
            jax.profiler.start_trace(self._dir)
            self._active = True
            log.info(
                "Profiling steps %d-%d into %s/plugins/profile.", self._start, self._end, self._dir
            )

    def after_step(self, step: int, state: Any) -> None:
        if self._active and step >= self._end:
            jax.block_until_ready(state)
            self.close()

    def close(self) -> None:
        if self._active:
            jax.profiler.stop_trace()
            self._active = False
            log.info("Profiler trace written under %s/plugins/profile.", self._dir)


def image_grid(images: np.ndarray, columns: int | None = None, min_size: int = 0) -> np.ndarray:
    """(N, H, W, C) in [-1, 1] -> one (rows*H', cols*W', C) uint8 grid with 1-pixel gaps.

    ``min_size``: images smaller than this (8x8 digits) are enlarged by a whole factor, pixels
    repeated, until their height reaches it (H' = k H), so that a grid file is readable as is.
    """
    images = np.asarray(images, np.float32)
    pixels = ((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).round().astype(np.uint8)
    k = max(1, -(-min_size // images.shape[1]))
    if k > 1:
        pixels = pixels.repeat(k, axis=1).repeat(k, axis=2)
    n, h, w, c = pixels.shape
    cols = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = pixels[
            i
        ]
    return grid
