"""One evaluation path for training's validation and ``jobs/evaluate.py``.

``model_input`` turns decoded batches into what a model takes; ``Evaluator`` accumulates per-image
segmentation metrics and class probabilities batch by batch (memory stays flat) and reports the same
figures in both places: ISIC per-image Jaccard, Dice, sensitivity, specificity, accuracy, thresholded
Jaccard, per-class AUC, accuracy and balanced accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from skinray import metrics
from skinray.data.transforms import normalise
from skinray.models import CLASS_LOGITS, MASK_LOGITS

__all__ = ["Evaluator", "model_input"]


def model_input(
    images: torch.Tensor,
    masks: torch.Tensor,
    input_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    roi: bool = False,
    guidance: torch.Tensor | None = None,
    roi_masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 images (N,3,H,W) → normalised float input, with guidance channels when the model takes
    them: ``guidance`` (N,C,H,W) from a guidance chain, or else the lesion mask repeated.

    ``roi``: the image is multiplied by a lesion mask first (the two-step paper's ROI): ``roi_masks``
    (a segmenter's prediction) when given, else ``masks``.
    """
    if roi:
        cut = roi_masks if roi_masks is not None else masks
        images = images * cut[:, None].to(images.device, images.dtype)
    x = normalise(images.to(device), mean, std)
    extra = input_channels - 3
    if extra > 0:
        if guidance is None:
            guidance = masks.to(device).float()[:, None].expand(-1, extra, -1, -1)
        if guidance.shape[1] != extra:
            raise ValueError(
                f"the model takes {extra} guidance channels, the chain gives {guidance.shape[1]}"
            )
        x = torch.cat([x, guidance.to(device)], dim=1)
    return x


class Evaluator:
    """Accumulates a model's outputs over batches; ``result()`` gives the metrics."""

    def __init__(self, class_names: Sequence[str] | None, mask_threshold: float = 0.5) -> None:
        self.class_names = list(class_names) if class_names is not None else None
        self.mask_threshold = mask_threshold
        self._per_image: dict[str, list[np.ndarray]] = {}
        self._probabilities: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self.images = 0

    def update(
        self, outputs: dict[str, torch.Tensor], masks: torch.Tensor, labels: torch.Tensor
    ) -> None:
        self.images += len(labels)
        if MASK_LOGITS in outputs:
            probability = torch.sigmoid(outputs[MASK_LOGITS].float()[:, 0])
            predicted = (probability > self.mask_threshold).cpu().numpy()
            per_image = metrics.per_image_segmentation_metrics(predicted, masks.cpu().numpy())
            for name, values in per_image.items():
                self._per_image.setdefault(name, []).append(values)
        if CLASS_LOGITS in outputs:
            self._probabilities.append(
                torch.softmax(outputs[CLASS_LOGITS].float(), 1).cpu().numpy()
            )
            self._labels.append(labels.cpu().numpy())

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


@torch.no_grad()
def evaluate_samples(
    model: torch.nn.Module,
    samples,
    *,
    image_size: Sequence[int] | None = None,
    batch_size: int = 16,
    roi: bool = False,
    device: str = "cpu",
) -> dict[str, float]:
    """Metrics of a saved model (``load_model``) on a labelled ``SampleTable``, decoded with the
    training pipeline's own reader; unreadable images are skipped and counted in ``skipped``."""
    from skinray.data.loading import decode_samples

    config = model.saved_config
    size = tuple(image_size or config.input_size)
    evaluator = Evaluator(config.class_names or samples.class_names, config.mask_threshold)
    model = model.to(device).eval()
    rows = samples.rows
    skipped = 0
    for start in range(0, rows.num_rows, batch_size):
        chunk = rows.slice(start, batch_size).to_pydict()
        batch = decode_samples(chunk, size, len(samples.class_names))
        ok = batch["ok"]
        skipped += int((~ok).sum())
        if not ok.any():
            continue
        images = torch.from_numpy(batch["image"][ok]).permute(0, 3, 1, 2)
        masks = torch.from_numpy(batch["mask"][ok])
        labels = torch.from_numpy(batch["label"][ok])
        x = model_input(images, masks, model.input_channels, config.mean, config.std, device, roi)
        evaluator.update(model(x), masks, labels)
    return {**evaluator.result(), "skipped": skipped}
