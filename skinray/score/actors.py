"""The model stages: actors that hold a saved model and run it on batches of decoded images.

Kept apart from the CPU stages (``skinray.score.stages``) so that the read/decode, ROI and row tasks
never import torch: their worker processes start in a fraction of the time and stay small.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from skinray.data.decode import ImageDecodeError, decode
from skinray.data.device_decode import decode_jpegs
from skinray.data.transforms import normalise
from skinray.models import CAM, CLASS_LOGITS, MASK_LOGITS, load_model
from skinray.score.stages import KILL_ACTOR_MARKER_ENV, healthy_rows, mark_failed

__all__ = ["ClassifyActor", "SegmentActor"]


def _probabilities(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(1, keepdims=True)


def _kill_once_if_asked() -> None:
    marker = os.environ.get(KILL_ACTOR_MARKER_ENV)
    if marker and not Path(marker).exists():
        Path(marker).write_text(f"actor pid {os.getpid()} exited on purpose\n")
        os._exit(1)


class _ModelActor:
    """A saved model on this actor's device, run in ``inference_mode`` (bf16 autocast on GPU)."""

    def __init__(
        self,
        model_uri: str,
        batch_size: int,
        kill_marker: str | None = None,
        cpu_threads: int | None = None,
    ) -> None:
        if kill_marker:
            os.environ[KILL_ACTOR_MARKER_ENV] = kill_marker
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu" and cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.model = load_model(model_uri, device=self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.config = self.model.saved_config
        self.batch_size = batch_size

    @torch.inference_mode()
    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        outputs: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(images), self.batch_size):
            chunk = torch.from_numpy(images[start : start + self.batch_size]).permute(0, 3, 1, 2)
            x = normalise(chunk.to(self.device), self.config.mean, self.config.std)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(
                self.device.type, torch.bfloat16, enabled=self.device.type == "cuda"
            ):
                result = self.model(x)
            for key, value in result.items():
                outputs.setdefault(key, []).append(value.float().cpu().numpy())
        return {key: np.concatenate(chunks) for key, chunks in outputs.items()}


class SegmentActor(_ModelActor):
    """Lesion mask at the model's resolution; class probabilities too when the model classifies."""

    def __call__(self, batch: dict) -> dict:
        _kill_once_if_asked()
        count = len(batch["source_uri"])
        height, width = batch["image"].shape[1:3]
        if "jpeg" in batch:
            self._decode_jpegs(batch)
        batch["mask"] = np.zeros((count, height, width), np.uint8)
        healthy = np.flatnonzero(healthy_rows(batch))
        if len(healthy):
            try:
                outputs = self.run(batch["image"][healthy])
            except (
                Exception
            ) as error:  # one bad batch must not fail the job: its rows become errors
                for i in healthy:
                    mark_failed(batch, i, "segment", error)
                return batch
            probability = 1 / (1 + np.exp(-outputs[MASK_LOGITS][:, 0]))
            batch["mask"][healthy] = (probability > self.config.mask_threshold).astype(np.uint8)
            if CLASS_LOGITS in outputs:
                probabilities = np.zeros((count, outputs[CLASS_LOGITS].shape[1]), np.float32)
                probabilities[healthy] = _probabilities(outputs[CLASS_LOGITS])
                batch["class_probabilities"] = probabilities
            if CAM in outputs:
                cams = np.zeros((count, *outputs[CAM].shape[2:]), np.float32)
                picked = outputs[CAM][np.arange(len(healthy)), outputs[CLASS_LOGITS].argmax(1)]
                cams[healthy] = picked
                batch["cam"] = cams
        return batch

    def _decode_jpegs(self, batch: dict) -> None:
        """The JPEGs the read tasks passed on undecoded, decoded on this actor's device; one the
        device refuses is decoded on CPU, and one that fails there too becomes a decode error."""
        jpegs, orientations = batch.pop("jpeg"), batch.pop("orientation")
        rows = [i for i in np.flatnonzero(healthy_rows(batch)) if len(jpegs[i])]
        if not rows:
            return
        batch["image"] = np.array(batch["image"])  # Ray hands batches over read-only
        size = batch["image"].shape[1:3]
        decoded = decode_jpegs(
            [jpegs[i] for i in rows], [int(orientations[i]) for i in rows], size, self.device
        )
        for i, pixels in zip(rows, decoded, strict=True):
            if pixels is None:
                uri = str(batch["source_uri"][i])
                try:
                    pixels = decode(jpegs[i], size, source=uri).rgb
                except ImageDecodeError as error:
                    mark_failed(batch, i, "decode", error)
                    continue
            batch["image"][i] = pixels


class ClassifyActor(_ModelActor):
    """Class probabilities of each ROI (and its CAM where the classifier yields one)."""

    def __call__(self, batch: dict) -> dict:
        _kill_once_if_asked()
        count = len(batch["source_uri"])
        healthy = np.flatnonzero(healthy_rows(batch))
        probabilities = np.zeros((count, len(self.config.class_names or ())), np.float32)
        if len(healthy):
            try:
                outputs = self.run(batch["roi"][healthy])
            except Exception as error:  # the batch's rows become errors; the job goes on
                for i in healthy:
                    mark_failed(batch, i, "classify", error)
                del batch["roi"]
                batch["class_probabilities"] = probabilities
                return batch
            probabilities[healthy] = _probabilities(outputs[CLASS_LOGITS])
            if CAM in outputs:
                cams = np.zeros((count, *outputs[CAM].shape[2:]), np.float32)
                cams[healthy] = outputs[CAM][
                    np.arange(len(healthy)), outputs[CLASS_LOGITS].argmax(1)
                ]
                batch["cam"] = cams
        batch["class_probabilities"] = probabilities
        del batch["roi"]
        return batch
