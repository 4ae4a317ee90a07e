"""One evaluation path for training's validation and ``jobs/evaluate.py``.

Both run a ``skinray.predict.Predictor`` on decoded batches and hand its ``Prediction`` to an
``Evaluator``, which accumulates per-image segmentation metrics and class probabilities batch by batch
(memory stays flat) and reports the same figures in both places: ISIC per-image Jaccard, Dice,
sensitivity, specificity, accuracy, thresholded Jaccard, per-class AUC, accuracy and balanced
accuracy. Ground-truth masks and labels reach the metrics only, never the model's input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from skinray import io, metrics
from skinray.data.decode import encode_png
from skinray.predict import Prediction, Predictor

__all__ = ["PREDICTION_SCHEMA", "Evaluator", "evaluate_samples"]


class Evaluator:
    """Accumulates predictions over batches; ``result()`` gives the metrics. With
    ``keep_predictions`` it also keeps each batch's ``Prediction.numpy()`` (``predictions``)."""

    def __init__(self, class_names: Sequence[str] | None, keep_predictions: bool = False) -> None:
        self.class_names = list(class_names) if class_names is not None else None
        self._per_image: dict[str, list[np.ndarray]] = {}
        self._probabilities: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self.keep_predictions = keep_predictions
        self.predictions: list[dict[str, np.ndarray]] = []
        self.images = 0

    def update(self, prediction: Prediction, masks: torch.Tensor, labels: torch.Tensor) -> None:
        self.images += len(labels)
        if prediction.mask is not None:
            predicted = prediction.mask.bool().cpu().numpy()
            per_image = metrics.per_image_segmentation_metrics(predicted, masks.cpu().numpy())
            for name, values in per_image.items():
                self._per_image.setdefault(name, []).append(values)
        if prediction.class_probabilities is not None:
            self._probabilities.append(prediction.class_probabilities.float().cpu().numpy())
            self._labels.append(labels.cpu().numpy())
        if self.keep_predictions:
            self.predictions.append(prediction.numpy())

    def result(self) -> dict[str, float]:
        results: dict[str, float] = {"images": self.images}
        for name, chunks in self._per_image.items():
            results[name] = float(np.concatenate(chunks).mean())
        if self._probabilities:
            results.update(
                metrics.classification_scores(
                    np.concatenate(self._labels),
                    np.concatenate(self._probabilities),
                    self.class_names,
                )
            )
        return results


@torch.inference_mode()
def evaluate_samples(
    predictor: Predictor,
    samples,
    *,
    batch_size: int = 16,
    evaluator: Evaluator | None = None,
    predictions_uri: str | None = None,
) -> dict[str, float]:
    """Metrics of ``predictor`` on a labelled ``SampleTable``, decoded at the predictor's input size
    with the training pipeline's own reader; unreadable images are skipped and counted in
    ``skipped``. ``predictions_uri``: also write each image's prediction there as Parquet
    (``PREDICTION_SCHEMA``), a batch at a time."""
    from skinray.data.loading import decode_samples

    evaluator = evaluator or Evaluator(predictor.class_names or samples.class_names)
    writer = _PredictionWriter(predictions_uri) if predictions_uri else None
    rows = samples.rows
    skipped = 0
    try:
        for start in range(0, rows.num_rows, batch_size):
            chunk = rows.slice(start, batch_size).to_pydict()
            batch = decode_samples(chunk, predictor.input_size, len(samples.class_names))
            ok = batch["ok"]
            skipped += int((~ok).sum())
            if not ok.any():
                continue
            images = torch.from_numpy(batch["image"][ok]).permute(0, 3, 1, 2)
            prediction = predictor(images)
            labels = torch.from_numpy(batch["label"][ok])
            evaluator.update(prediction, torch.from_numpy(batch["mask"][ok]), labels)
            if writer:
                writer.write(batch["image_uri"][ok], labels.numpy(), prediction)
    finally:
        if writer:
            writer.close()
    return {**evaluator.result(), "skipped": skipped}


PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("image_uri", pa.string()),
        pa.field("label", pa.int64()),
        pa.field("class_probabilities", pa.list_(pa.float32())),
        pa.field("mask_png", pa.binary()),
        pa.field("roi_box", pa.list_(pa.float32())),
    ]
)


class _PredictionWriter:
    def __init__(self, uri: str) -> None:
        fs, path = io.resolve(uri)
        self._writer = pq.ParquetWriter(path, PREDICTION_SCHEMA, filesystem=fs)

    def write(self, uris, labels: np.ndarray, prediction: Prediction) -> None:
        values = prediction.numpy()
        count = len(uris)
        probabilities = values.get("class_probabilities")
        masks = values.get("mask")
        boxes = values.get("roi_box")
        table = pa.table(
            {
                "image_uri": [str(u) for u in uris],
                "label": labels.astype(np.int64),
                "class_probabilities": [None] * count
                if probabilities is None
                else list(probabilities.astype(np.float32)),
                "mask_png": [None] * count
                if masks is None
                else [encode_png(m * 255) for m in masks],
                "roi_box": [None] * count if boxes is None else list(boxes.astype(np.float32)),
            },
            schema=PREDICTION_SCHEMA,
        )
        self._writer.write_table(table)

    def close(self) -> None:
        self._writer.close()
