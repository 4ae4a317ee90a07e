"""The ROI classifier's training masks, predicted once (``data.roi_masks: cached``).

The two-step paper segments every image first and trains its classifier on the cut ROIs (Innani et
al. Sec. 3.2). Running the segmenter on each augmented batch instead (``live``) trained
``classifier_roi_cpu`` at 2.2–2.9 images/s on 2 shared cores, against 12.3–12.7 cached. Here the
saved segmenter predicts the lesion of each un-augmented training image once, at the training
``image_size`` and through the same ``segment_at`` / ``predicted_lesion`` as ``TwoStep``; the masks
are written as PNGs beside the run and put in the training table's ``mask_uri`` column, so the
augmentation moves each with its image and the ROI is cut from it. Ground-truth masks are dropped
from that table: they never reach a model input. Validation still runs the segmenter (the path
evaluation and scoring take).
"""

from __future__ import annotations

import hashlib
import logging

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from skinray import io
from skinray.data.datasets import SampleTable
from skinray.data.loading import decode_samples
from skinray.data.transforms import normalise
from skinray.models import load_model
from skinray.models.two_step import predicted_lesion, segment_at

__all__ = ["cache_predicted_masks", "mask_cache_folder"]

logger = logging.getLogger(__name__)


def mask_cache_folder(
    output: str, segmenter_config_sha256: str, image_size: tuple[int, int]
) -> str:
    """Where one segmenter's masks at one size live: a new segmenter or size gets a new folder, and
    so does a segmenter whose weights stay but whose ``config.json`` changes what it predicts (its
    mask threshold, input size or normalisation: ``SavedModelConfig.config_sha256``)."""
    height, width = image_size
    return io.join(output, "roi-masks", f"{segmenter_config_sha256[:16]}-{height}x{width}")


def _existing(folder: str) -> set[str]:
    fs, path = io.resolve(folder)
    entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return {e.base_name for e in entries if e.type == pafs.FileType.File}


@torch.no_grad()
def _predict(segmenter, images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) → uint8 (N, H, W) lesion masks, 255 where lesion."""
    config = segmenter.saved_config
    x = normalise(torch.from_numpy(images).permute(0, 3, 1, 2), config.mean, config.std)
    lesion = predicted_lesion(segment_at(segmenter, x, config.input_size), config.mask_threshold)
    return lesion.numpy().astype(np.uint8) * 255


def cache_predicted_masks(
    samples: SampleTable,
    segmenter_uri: str,
    image_size: tuple[int, int],
    output: str,
    batch_size: int = 32,
) -> SampleTable:
    """``samples`` with ``mask_uri`` pointing at ``segmenter_uri``'s predicted mask of each image
    (None where the image cannot be read: training skips it). Masks already in the cache folder are
    not predicted again, so a resumed or repeated run reuses them."""
    segmenter = load_model(segmenter_uri)
    folder = mask_cache_folder(output, segmenter.saved_config.config_sha256, image_size)
    done = _existing(folder)
    ids = samples.rows["image_id"].to_pylist()
    uris = samples.rows["image_uri"].to_pylist()
    labels = samples.rows["label"].to_pylist()  # synthetic images are drawn from their label
    # Named by image and URI: two folders of a manifest may each hold an img_001.jpg.
    names = [
        f"{i}-{hashlib.sha256(u.encode()).hexdigest()[:12]}.png"
        for i, u in zip(ids, uris, strict=True)
    ]
    todo = [i for i, name in enumerate(names) if name not in done]
    unreadable: set[int] = set()
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        batch = {
            "image_uri": [uris[i] for i in chunk],
            "mask_uri": [None] * len(chunk),
            "label": [labels[i] for i in chunk],
        }
        decoded = decode_samples(batch, image_size, len(samples.class_names))
        masks = _predict(segmenter, decoded["image"])
        for i, ok, mask in zip(chunk, decoded["ok"], masks, strict=True):
            if not ok:
                unreadable.add(i)
                continue
            encoded = cv2.imencode(".png", mask)[1].tobytes()
            io.write_bytes(io.join(folder, names[i]), encoded)
    logger.info(
        "ROI masks: %d predicted, %d cached, %d unreadable, in %s",
        len(todo) - len(unreadable),
        len(ids) - len(todo),
        len(unreadable),
        folder,
    )
    mask_uris = [None if i in unreadable else io.join(folder, n) for i, n in enumerate(names)]
    rows = samples.rows.set_column(
        samples.rows.schema.get_field_index("mask_uri"),
        "mask_uri",
        pa.array(mask_uris, pa.string()),
    )
    return SampleTable(rows, samples.class_names)
