"""Sample tables → Ray Datasets of decoded, resized (image, mask, label) rows.

Reading and decoding run inside Ray Data's ``map_batches``, so they stream and scale with the CPUs of
the cluster. An image that cannot be read or decoded does not stop training: its row comes out with
``ok = False`` and the reason in ``error`` (logged with the file's URI), the training loop skips it and
counts it in the epoch's metrics.
"""

from __future__ import annotations

import functools
import json
import logging

import cv2
import numpy as np
import pyarrow.fs as pafs

from skinray import io
from skinray.data.datasets import SYNTHETIC_SCHEME, SampleTable
from skinray.data.decode import ImageDecodeError, decode, decode_mask
from skinray.data.synthetic import synthetic_sample

__all__ = ["decode_samples", "to_ray_dataset"]

logger = logging.getLogger(__name__)


@functools.cache
def _filesystem(scheme: str) -> pafs.FileSystem:
    # One filesystem per worker process: S3 clients are expensive to build.
    return io.s3_filesystem() if scheme == "s3" else pafs.LocalFileSystem()


def _read(uri: str) -> bytes:
    return io.read_bytes(uri, _filesystem("s3" if uri.startswith("s3://") else "local"))


def read_mask(uri: str) -> np.ndarray:
    """A 0/255 mask file → uint8 (H, W) 0/1 at its own resolution, lesion where > 127."""
    return (decode_mask(_read(uri), source=uri) > 127).astype(np.uint8)


def _load_one(image_uri, mask_uri, label, size, num_classes):
    height, width = size
    if image_uri.startswith(SYNTHETIC_SCHEME):
        sample = synthetic_sample(
            int(image_uri.removeprefix(SYNTHETIC_SCHEME)),
            size,
            label=label,
            num_classes=num_classes,
        )
        return sample.image, sample.mask
    image = decode(_read(image_uri), (height, width), source=image_uri).rgb
    if mask_uri is None:
        return image, np.zeros((height, width), np.uint8)
    # INTER_NEAREST takes each block's top-left pixel, putting a shrunk mask 0.3-0.5 px off its
    # image (which INTER_AREA shrinks about the centre); the exact variant samples the centre.
    mask = cv2.resize(read_mask(mask_uri), (width, height), interpolation=cv2.INTER_NEAREST_EXACT)
    return image, mask


def decode_samples(batch: dict, image_size: tuple[int, int], num_classes: int) -> dict:
    """``map_batches`` body: URIs in, ``image`` (N,H,W,3) uint8, ``mask`` (N,H,W) uint8 out."""
    height, width = image_size
    count = len(batch["image_uri"])
    images = np.zeros((count, height, width, 3), np.uint8)
    masks = np.zeros((count, height, width), np.uint8)
    ok = np.ones(count, bool)
    errors = [""] * count
    for i in range(count):
        image_uri, mask_uri = str(batch["image_uri"][i]), batch["mask_uri"][i]
        mask_uri = None if mask_uri is None or mask_uri != mask_uri else str(mask_uri)
        try:
            images[i], masks[i] = _load_one(
                image_uri, mask_uri, int(batch["label"][i]), (height, width), num_classes
            )
        except (ImageDecodeError, FileNotFoundError, OSError) as error:
            ok[i], errors[i] = False, f"{type(error).__name__}: {error}"
            logger.warning("skipping %s: %s", image_uri, errors[i])
    return {
        "image": images,
        "mask": masks,
        "label": np.asarray(batch["label"], np.int64),
        "ok": ok,
        "error": np.array(errors, dtype=object),
        "image_uri": np.asarray(batch["image_uri"], dtype=object),
    }


class TrainingRows:
    """The training dataset, built by Ray Train at each worker-group start (``datasets`` takes
    this callable): a first start, a group restarted after a lost worker, a restarted driver
    continuing its run folder, or a ``--resume``. Ray Data draws each epoch's order from the
    shuffle seed and the dataset's execution count, which every start begins again at 0, so a
    restored run would replay the first epochs' orders from the epoch it restores: the seed is
    offset by that epoch (the newest checkpoint's in ``run_folder``, else ``resume``'s). The
    driver's Ray Data settings (no progress bars) go with it: it is built in Ray Train's
    controller, whose own are the defaults."""

    def __init__(
        self,
        samples: SampleTable,
        image_size: tuple[int, int],
        shuffle_seed: int | None,
        run_folder: str | None = None,
        resume: str | None = None,
    ) -> None:
        import ray.data

        self.samples, self.image_size, self.shuffle_seed = samples, tuple(image_size), shuffle_seed
        self.run_folder, self.resume = run_folder, resume
        self.context = ray.data.DataContext.get_current().copy()

    def seed(self) -> int | None:
        """The shuffle seed of a start now: the run's, offset by the epoch it restores."""
        if self.shuffle_seed is None:
            return None
        restored = _latest_epoch(self.run_folder) or _latest_epoch(self.resume, checkpoint=True)
        return self.shuffle_seed + 1_000_003 * restored

    def __call__(self):
        import ray.data

        with ray.data.DataContext.current(self.context):
            return to_ray_dataset(self.samples, self.image_size, shuffle_seed=self.seed())


def _latest_epoch(folder: str | None, checkpoint: bool = False) -> int:
    """The epochs done by the newest checkpoint in a Ray Train run ``folder`` (or, ``checkpoint``,
    by the checkpoint ``folder`` itself), from its ``history.json``; 0 where there is none."""
    if not folder:
        return 0
    fs, path = io.resolve(folder)
    if checkpoint:
        folders = [path]
    else:
        entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        folders = [e.path for e in entries if e.base_name.startswith("checkpoint_")]
    epochs = [0]
    for where in folders:
        history = f"{where}/history.json"
        if fs.get_file_info(history).type == pafs.FileType.File:
            with fs.open_input_stream(history) as stream:
                epochs += [int(entry["epoch"]) for entry in json.loads(stream.read())]
    return max(epochs)


def to_ray_dataset(
    samples: SampleTable,
    image_size: tuple[int, int],
    rows_per_block: int = 16,
    shuffle_seed: int | None = None,
):
    """A lazily decoded Ray Dataset of the samples (nothing is read until it is iterated).

    ``shuffle_seed``: the rows come in a new random order every time the dataset is iterated (every
    epoch), the same sequence of orders for the same seed. The listing rows (URIs and labels) are
    shuffled before decoding, so the shuffle moves bytes of text, not decoded images."""
    import ray.data

    dataset = ray.data.from_arrow(samples.rows)
    if dataset.num_blocks() * rows_per_block < len(samples):
        dataset = dataset.repartition(max(1, len(samples) // rows_per_block))
    if shuffle_seed is not None:
        # reseed_after_execution: the seed is combined with the execution index, so each epoch's
        # execution draws its own permutation (ISIC 2017 and HAM10000 listings are sorted by id,
        # and diagnoses cluster by id range).
        seed = ray.data.RandomSeedConfig(seed=shuffle_seed, reseed_after_execution=True)
        dataset = dataset.random_shuffle(seed=seed)
    return dataset.map_batches(
        decode_samples,
        batch_size=rows_per_block,
        batch_format="numpy",
        fn_kwargs={"image_size": tuple(image_size), "num_classes": len(samples.class_names)},
    )
