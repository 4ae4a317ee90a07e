"""The model stage: an actor that holds a ``Predictor`` and runs it on batches of decoded images.

Kept apart from the CPU stages (``skinray.score.stages``) so that the read/decode, ROI and row tasks
never import torch: their worker processes start in a fraction of the time and stay small.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import ray
import torch

from skinray.backends import GuardedPredictor, calibration_sha256, runtime_versions
from skinray.data.decode import ImageDecodeError, decode
from skinray.data.device_decode import decode_jpegs
from skinray.predict import Predictor
from skinray.score.stages import (
    CPU_DECODER,
    KILL_ACTOR_MARKER_ENV,
    device_decoder,
    healthy_rows,
    mark_failed,
)
from skinray.uncertainty import normalised_entropy

__all__ = ["PredictActor"]

log = logging.getLogger(__name__)
_BACKEND = "_backend"  # the backend that made each row, beside the output columns


def _kill_once_if_asked() -> None:
    marker = os.environ.get(KILL_ACTOR_MARKER_ENV)
    if marker and not Path(marker).exists():
        Path(marker).write_text(f"actor pid {os.getpid()} exited on purpose\n")
        os._exit(1)


class PredictActor:
    """A ``Predictor`` (the segmenter, or the two-step pair segmenter → ROI → classifier) on this
    actor's device (channels_last on GPU), in ``inference_mode``: per row the lesion mask at the
    decoded size, class probabilities and their normalised entropy, the OOD score and flag where
    the classifier ships a bank (``skinray.ood``), the flips' disagreement where the model runs
    test-time flips, the predicted class's CAM and the ROI box.

    The networks run on ``backend`` (``skinray.backends``; None: the device's default), int8
    calibrated on ``calibration_images`` (N×H×W×3 uint8 at the decode size, or their object
    reference: the run reads them once, at the door), held to the accuracy guard against eager
    over the first ``GUARD_MIN_IMAGES`` images (``GuardedPredictor``). Each row records which
    decoder made its input, the backend that made its outputs and, for int8, its calibration
    images' SHA-256."""

    def __init__(
        self,
        segmenter: str,
        classifier: str | None,
        batch_size: int,
        kill_marker: str | None = None,
        cpu_threads: int | None = None,
        backend: str | None = None,
        test_delay_s: float = 0.0,
        calibration_images: np.ndarray | ray.ObjectRef | None = None,
    ) -> None:
        self.test_delay_s = test_delay_s  # PREDICT_DELAY_ENV, for the resume test
        if kill_marker:
            os.environ[KILL_ACTOR_MARKER_ENV] = kill_marker
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cpu" and cpu_threads:
            torch.set_num_threads(cpu_threads)
        eager = Predictor.load(segmenter, classifier, device=device)
        if device.type == "cuda":
            eager.model = eager.model.to(memory_format=torch.channels_last)
        calibration = calibration_images
        if isinstance(calibration, ray.ObjectRef):
            calibration = ray.get(calibration)
        self.guarded = GuardedPredictor(
            eager, backend, threads=cpu_threads, calibration_images=calibration
        )
        # Which images calibrated int8 changes its masks: every int8 row records them.
        self.calibration_sha256 = (
            calibration_sha256(calibration) if self.backend == "openvino-int8" else None
        )
        self.batch_size = batch_size
        self._output_columns: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None

    @property
    def predictor(self) -> Predictor:  # the backend's, or eager after a fallback
        return self.guarded.predictor

    @property
    def backend(self) -> str:
        return self.guarded.backend

    @property
    def fallback_reason(self) -> str | None:
        return self.guarded.fallback_reason

    def __call__(self, batch: dict) -> dict:
        _kill_once_if_asked()
        time.sleep(self.test_delay_s)
        count = len(batch["source_uri"])
        batch["decode"] = np.array([CPU_DECODER] * count, dtype=object)
        if "jpeg" in batch:
            self._decode_jpegs(batch)
        batch["backend"] = np.array([None] * count, dtype=object)
        batch["int8_calibration_sha256"] = np.array([None] * count, dtype=object)
        batch["backend_versions"] = np.array([None] * count, dtype=object)
        healthy = np.flatnonzero(healthy_rows(batch))
        outputs, ran = self._predict_rows(batch, healthy)
        backends = outputs.pop(_BACKEND, np.array([], dtype=object))
        batch.update(self._zero_columns(count, batch["image"].shape[1:3]))
        for key, values in outputs.items():
            batch[key][ran] = values
        batch["backend"][ran] = backends  # what made each row: a guard may fall back mid-batch
        batch["backend_versions"][ran] = [runtime_versions(b) for b in backends]
        batch["int8_calibration_sha256"][ran] = [
            self.calibration_sha256 if b == "openvino-int8" else None for b in backends
        ]
        return batch

    def _predict_rows(self, batch: dict, rows: np.ndarray) -> tuple[dict, np.ndarray]:
        """The outputs of the images of ``rows``, and the rows they are of. Where the batch
        fails, each image is tried alone, so that only those that fail alone become errors."""
        if not len(rows):
            return {}, rows
        try:
            return self._predict(batch["image"][rows]), rows
        except Exception as error:  # one bad batch must not fail the job
            if len(rows) == 1:
                mark_failed(batch, rows[0], "predict", error)
                return {}, rows[:0]
            log.warning("a batch of %d images failed (%s); trying each alone", len(rows), error)
        alone = [self._predict_rows(batch, rows[k : k + 1]) for k in range(len(rows))]
        ran = [(outputs, row) for outputs, row in alone if len(row)]
        if not ran:
            return {}, rows[:0]
        keys = ran[0][0]
        outputs = {key: np.concatenate([o[key] for o, _ in ran]) for key in keys}
        return outputs, np.concatenate([row for _, row in ran])

    def _zero_columns(self, count: int, image_size: tuple[int, int]) -> dict[str, np.ndarray]:
        """Every output column of a healthy batch, zero for ``count`` rows: a batch without some
        of them (all its rows failed) could not be joined with healthy ones by the next stage's
        batcher, and failed the run. Shapes from the first batch that ran, else from a probe."""
        if self._output_columns is None:
            probe = torch.zeros((1, 3, *image_size), dtype=torch.uint8)
            eager = self.guarded.eager  # the guard runs on real images only
            self._remember_columns(self._derived(eager(probe).numpy()))
        return {
            key: np.zeros((count, *shape), dtype)
            for key, (shape, dtype) in self._output_columns.items()
        }

    def _remember_columns(self, outputs: dict[str, np.ndarray]) -> None:
        if self._output_columns is None:
            self._output_columns = {
                key: (v.shape[1:], v.dtype) for key, v in outputs.items() if key != _BACKEND
            }

    def _predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The rows' output columns, and under ``_BACKEND`` the backend that made each row."""
        chunks: dict[str, list[np.ndarray]] = {}
        backends = []
        for start in range(0, len(images), self.batch_size):
            chunk = torch.from_numpy(images[start : start + self.batch_size]).permute(0, 3, 1, 2)
            for key, value in self.guarded(chunk).numpy().items():
                chunks.setdefault(key, []).append(value)
            backends += [self.backend] * len(chunk)
        outputs = self._derived({key: np.concatenate(v) for key, v in chunks.items()})
        self._remember_columns(outputs)
        return {**outputs, _BACKEND: np.array(backends, dtype=object)}

    def _derived(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The columns rows take from the predictor's outputs."""
        outputs.pop("mask_probability", None)
        if "class_probabilities" in outputs:
            probabilities = torch.from_numpy(outputs["class_probabilities"])
            outputs["class_entropy"] = normalised_entropy(probabilities).numpy()
        if "ood_score" in outputs:
            scores = torch.from_numpy(outputs["ood_score"])
            outputs["ood"] = self.predictor.ood.flags(scores).numpy()
        return outputs

    def _decode_jpegs(self, batch: dict) -> None:
        """The JPEGs the read tasks passed on undecoded, decoded on this actor's device; one the
        device refuses is decoded on CPU, and one that fails there too becomes a decode error."""
        jpegs, orientations = batch.pop("jpeg"), batch.pop("orientation")
        rows = [i for i in np.flatnonzero(healthy_rows(batch)) if len(jpegs[i])]
        if not rows:
            return
        batch["image"] = np.array(batch["image"])  # Ray hands batches over read-only
        batch["decode_scale"] = np.array(batch["decode_scale"])
        size = batch["image"].shape[1:3]
        on_device = decode_jpegs(
            [jpegs[i] for i in rows],
            [int(orientations[i]) for i in rows],
            size,
            self.predictor.device,
        )
        for i, pixels in zip(rows, on_device, strict=True):
            if pixels is None:
                uri = str(batch["source_uri"][i])
                try:
                    on_cpu = decode(jpegs[i], size, source=uri)
                except ImageDecodeError as error:
                    mark_failed(batch, i, "decode", error)
                    continue
                pixels, batch["decode_scale"][i] = on_cpu.rgb, on_cpu.scale_denominator
            else:
                batch["decode"][i] = device_decoder(self.predictor.device.type)
            batch["image"][i] = pixels
