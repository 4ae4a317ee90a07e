"""One prediction path: decoded uint8 images in, the contract's outputs out.

A ``Predictor`` wraps saved model(s) — a single model, a joint model (MB-DCNN, CLNet), a two-step pair
(a ``two_step`` composite, or a segmenter and a classifier assembled into one), or a model under
training with its guidance chain — and owns every step around the networks: resizing to the model's
input size, normalisation, guidance channels, sigmoid/softmax, the mask threshold, the CAM of the
predicted class and the ROI box. Training's validation, the training inputs of guided and ROI
stages, ``jobs/evaluate.py`` and the scoring actors all call it, so a figure measured in one place
holds in the others. Ground truth never enters: a model that takes guidance channels gets them from
the chain's own predictions, and a ROI classifier from its segmenter's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn

from skinray.data.transforms import normalise
from skinray.models import (
    CAM,
    CLASS_LOGITS,
    FEATURES,
    MASK_LOGITS,
    ROI_BOX,
    load_model,
    read_model_config,
)
from skinray.models.mbdcnn import normalise_cam
from skinray.models.serialization import SavedModelConfig
from skinray.models.two_step import DEFAULT_ROI_MARGIN, TwoStep
from skinray.uncertainty import flip_disagreement

__all__ = ["ModelCheckError", "Prediction", "Predictor", "check_models"]


class ModelCheckError(ValueError):
    """Saved model(s) that cannot serve the asked role; the message names the directory."""


@dataclass
class Prediction:
    """Outputs for N images at the predictor's input size (H, W), each where the model makes it."""

    mask_probability: torch.Tensor | None  # (N, H, W) float in [0, 1]
    mask: torch.Tensor | None  # (N, H, W) uint8, probability > the model's threshold
    class_probabilities: torch.Tensor | None  # (N, C), softmax
    cam: torch.Tensor | None  # (N, h, w) the predicted class's raw map
    roi_box: torch.Tensor | None  # (N, 4) (y0, x0, y1, x1) in input pixels, end-exclusive
    ood_score: torch.Tensor | None = None  # (N,) distance from the training data (skinray.ood)
    flip_disagreement: torch.Tensor | None = None  # (N,) over the test-time flips' probabilities

    def numpy(self) -> dict[str, np.ndarray]:
        return {
            name: value.float().cpu().numpy() if name != "mask" else value.cpu().numpy()
            for name, value in vars(self).items()
            if value is not None
        }


class Predictor:
    """``model`` (``forward`` → the registry's output dict) and what it takes to use it.

    Args:
        model: a registered model; it is used as it is (train mode or not: the caller decides).
        input_size: (height, width) the model takes; images of another size are resized to it.
        mean, std: the model's input normalisation.
        class_names: one per class logit, where the model classifies.
        mask_threshold: lesion where the mask probability is above it.
        guidance: saved models run in order before ``model`` whose last output becomes its extra
            input channels (MB-DCNN: coarse-SN's lesion probability for mask-CN; coarse-SN then
            mask-CN's normalised CAMs for enhanced-SN, Sec. III-B and III-C).
        temperature: class logits are divided by it before the softmax (``skinray.calibration``).
        test_time_flips: average the logits over the image and its two flips (3× the compute).
        ood: the classifier's out-of-distribution score (``skinray.ood``), from its features.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        input_size: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        class_names: Sequence[str] | None = None,
        mask_threshold: float = 0.5,
        guidance: Sequence[nn.Module] = (),
        temperature: float = 1.0,
        test_time_flips: bool = False,
        ood=None,
        source: str = "model",
    ) -> None:
        self.model = model
        self.ood = ood
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.mean, self.std = tuple(mean), tuple(std)
        self.class_names = list(class_names) if class_names is not None else None
        self.mask_threshold = float(mask_threshold)
        self.guidance = list(guidance)
        self.temperature = float(temperature)
        self.test_time_flips = bool(test_time_flips)
        extra = getattr(model, "input_channels", 3) - 3
        if extra > 0 and not self.guidance:
            raise ModelCheckError(
                f"{source}: {getattr(model, 'skinray_model_name', 'the model')} takes {extra} "
                "guidance channel(s) from upstream models; use the assembled chain (e.g. the "
                "mbdcnn model of `jobs/train.py mbdcnn`), never ground-truth masks"
            )

    # -- building ---------------------------------------------------------------------------------
    @classmethod
    def from_saved(cls, model: nn.Module, source: str = "model", **overrides) -> Predictor:
        config: SavedModelConfig = model.saved_config
        settings = dict(
            input_size=config.input_size,
            mean=config.mean,
            std=config.std,
            class_names=config.class_names,
            mask_threshold=config.mask_threshold,
            temperature=config.temperature,
            test_time_flips=config.test_time_flips,
            ood=getattr(model, "ood", None),
            source=source,
        )
        return cls(model, **{**settings, **overrides})

    @classmethod
    def load(
        cls, uri: str, classifier: str | None = None, device: str | torch.device = "cpu"
    ) -> Predictor:
        """The saved model at ``uri``; with ``classifier``, the two-step pair ``uri`` → ROI →
        ``classifier``, exactly as the ``two_step`` composite saved from the same two networks. A
        classifier of lesion ROIs is refused alone (``ModelCheckError``): it needs its segmenter."""
        if classifier is None:
            model = load_model(uri, device=device)
            if model.saved_config.roi_source_size is not None:  # fed whole images, it is wrong
                raise ModelCheckError(_needs_its_segmenter(uri, model.saved_config))
            return cls.from_saved(model, source=uri)
        segmenter, roi_classifier = (
            load_model(uri, device=device),
            load_model(classifier, device=device),
        )
        return cls.pair(segmenter, roi_classifier, source=f"{uri} + {classifier}")

    @classmethod
    def pair(cls, segmenter: nn.Module, classifier: nn.Module, source: str = "pair") -> Predictor:
        """Segmenter and ROI classifier (both with ``saved_config``, or made by ``create_model``
        with one attached) as one two-step predictor. Test-time flips run when either model was
        saved with them: the pair flips as a whole, its mask and class logits alike."""
        composite, input_size = assemble_two_step(segmenter, classifier)
        seg, clf = segmenter.saved_config, classifier.saved_config
        return cls(
            composite,
            input_size=input_size,
            mean=seg.mean,
            std=seg.std,
            class_names=clf.class_names,
            mask_threshold=seg.mask_threshold,
            temperature=clf.temperature,
            test_time_flips=seg.test_time_flips or clf.test_time_flips,
            ood=getattr(classifier, "ood", None),
            source=source,
        )

    @property
    def device(self) -> torch.device:
        parameter = next(self.model.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    # -- the path ---------------------------------------------------------------------------------
    def as_batch(self, images) -> torch.Tensor:
        """uint8 images → (N, 3, H, W) uint8 at the input size on the model's device. ``images``:
        a (N, 3, H, W) tensor, a (N, H, W, 3) array, or a list of H×W×3 arrays of any sizes (each
        resized with ``INTER_AREA``, as ``skinray.data.decode`` resizes)."""
        if isinstance(images, torch.Tensor):
            batch = images
        else:
            height, width = self.input_size
            arrays = [
                image
                if image.shape[:2] == (height, width)
                else cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
                for image in images
            ]
            batch = torch.from_numpy(np.ascontiguousarray(np.stack(arrays))).permute(0, 3, 1, 2)
        if tuple(batch.shape[-2:]) != self.input_size:
            batch = (
                torch.nn.functional.interpolate(
                    batch.float(), self.input_size, mode="bilinear", antialias=True
                )
                .round()
                .clamp(0, 255)
                .to(torch.uint8)
            )
        return batch.to(self.device)

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) at the input size → the model's normalised input, with guidance."""
        x = normalise(images, self.mean, self.std)
        if self.guidance:
            x = torch.cat([x, self._guidance(images)], dim=1)
        return x

    @torch.no_grad()
    def _guidance(self, images: torch.Tensor) -> torch.Tensor:
        guidance, size = None, tuple(images.shape[-2:])
        for model in self.guidance:
            config = model.saved_config
            x = normalise(images, config.mean, config.std)
            if guidance is not None:
                x = torch.cat([x, guidance], dim=1)
            outputs = model(x)
            if CAM in outputs:
                guidance = normalise_cam(outputs[CAM].float(), size)
            else:
                guidance = torch.sigmoid(outputs[MASK_LOGITS].float())
        return guidance

    def prediction(self, outputs: dict[str, torch.Tensor]) -> Prediction:
        """The model's raw outputs → probabilities, thresholded mask, predicted class's CAM, box."""
        probability = mask = probabilities = cam = None
        if MASK_LOGITS in outputs:
            probability = torch.sigmoid(outputs[MASK_LOGITS].float()[:, 0])
            mask = (probability > self.mask_threshold).to(torch.uint8)
        if CLASS_LOGITS in outputs:
            probabilities = torch.softmax(outputs[CLASS_LOGITS].float() / self.temperature, 1)
            if CAM in outputs:
                picked = probabilities.argmax(1)
                cam = outputs[CAM].float()[torch.arange(len(picked)), picked]
        box = outputs[ROI_BOX].float() if ROI_BOX in outputs else None
        ood_score = None
        if self.ood is not None and FEATURES in outputs:
            ood_score = self.ood.score(outputs[FEATURES])
        return Prediction(probability, mask, probabilities, cam, box, ood_score)

    def run(self, images) -> tuple[dict[str, torch.Tensor], Prediction]:
        """Raw outputs (float32) and the prediction; runs in whatever mode the model is in. With
        ``test_time_flips`` the mask and class logits are the mean over the image and its
        horizontal and vertical flips (each flipped back); CAM and ROI box come from the unflipped
        image, as do the features. The prediction's ``flip_disagreement`` is the views'
        disagreement (``skinray.uncertainty.flip_disagreement``)."""
        x = self.model_input(self.as_batch(images))
        outputs = self._forward(x)
        if not self.test_time_flips:
            return outputs, self.prediction(outputs)
        views = [outputs.get(CLASS_LOGITS)]
        for dims in ([-1], [-2]):
            flipped = self._forward(x.flip(dims))
            if MASK_LOGITS in outputs:
                outputs[MASK_LOGITS] = outputs[MASK_LOGITS] + flipped[MASK_LOGITS].flip(dims)
            if CLASS_LOGITS in outputs:
                outputs[CLASS_LOGITS] = outputs[CLASS_LOGITS] + flipped[CLASS_LOGITS]
                views.append(flipped[CLASS_LOGITS])
        for key in (MASK_LOGITS, CLASS_LOGITS):
            if key in outputs:
                outputs[key] = outputs[key] / 3
        prediction = self.prediction(outputs)
        if CLASS_LOGITS in outputs:
            view_probabilities = torch.softmax(torch.stack(views) / self.temperature, 2)
            prediction.flip_disagreement = flip_disagreement(view_probabilities)
        return outputs, prediction

    def _forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.model(x)  # f32 on every device: bf16 is a backend (skinray.backends)
        return {key: value.float() for key, value in outputs.items()}

    @torch.inference_mode()
    def __call__(self, images) -> Prediction:
        return self.run(images)[1]


def pair_input_size(seg: SavedModelConfig, clf: SavedModelConfig) -> tuple[int, int]:
    """The size a segmenter → classifier pair decodes its images to: for an ROI classifier, the
    size its training ROIs were cut from; for a whole-image classifier, its own input size, so
    that it sees each image as in training."""
    return tuple(clf.roi_source_size or clf.input_size)


def assemble_two_step(segmenter: nn.Module, classifier: nn.Module) -> tuple[TwoStep, tuple]:
    """The ``two_step`` composite around two saved networks (shared, not copied), and the size its
    images are decoded to (``pair_input_size``). A classifier saved with ``roi_source_size``
    (trained on ROIs) gets the ROI; one without it was trained on whole images and gets the image."""
    seg, clf = segmenter.saved_config, classifier.saved_config
    composite = TwoStep.from_stages(
        segmenter,
        classifier,
        segmenter_input_size=seg.input_size,
        classifier_input_size=clf.input_size,
        mask_threshold=seg.mask_threshold,
        roi_margin=clf.roi_margin if clf.roi_margin is not None else DEFAULT_ROI_MARGIN,
        segmenter_normalization=(seg.mean, seg.std),
        classifier_normalization=(clf.mean, clf.std),
        classifier_input="roi" if clf.roi_source_size else "image",
    )
    return composite.to(next(segmenter.parameters()).device), pair_input_size(seg, clf)


def check_models(
    segmenter: str, classifier: str | None = None, *, segments: bool = True
) -> list[SavedModelConfig]:
    """Read the saved configs (no weights) and refuse, with one line naming the directory, what
    cannot be scored or evaluated: a segmenter (``segments``) without a mask output, a classifier
    of lesion ROIs without the segmenter that cuts them, a classifier without one class name per
    class, a model that needs guidance channels, a pair whose classifier does not
    take RGB ROIs, and input sizes that are not positive (height, width) pairs; then load each
    (weights against their hash, the architecture, the OOD bank), so that a model the actors
    could not load fails here, not in them."""
    configs = [_read(segmenter)] + ([_read(classifier)] if classifier else [])
    for uri, config in zip([segmenter, classifier], configs, strict=False):
        if len(config.input_size) != 2 or min(config.input_size) < 1:
            raise ModelCheckError(f"{uri}: input_size {list(config.input_size)} is not (h, w) >= 1")
        if CLASS_LOGITS in config.outputs and not config.class_names:
            raise ModelCheckError(
                f"{uri}: {config.model} has class logits but no class names in config.json"
            )
        if config.input_channels != 3:
            raise ModelCheckError(
                f"{uri}: {config.model} takes {config.input_channels} input channels (guidance "
                "from upstream models); use the assembled chain (e.g. mbdcnn)"
            )
    first = configs[0]
    if not classifier and first.roi_source_size is not None:
        raise ModelCheckError(_needs_its_segmenter(segmenter, first))
    if segments and MASK_LOGITS not in first.outputs:
        raise ModelCheckError(f"{segmenter}: {first.model} has no mask output; it cannot segment")
    if classifier and CLASS_LOGITS not in configs[1].outputs:
        raise ModelCheckError(f"{classifier}: {configs[1].model} has no class output")
    for uri in filter(None, [segmenter, classifier]):
        _loadable(uri)
    return configs


def _loadable(uri: str) -> None:
    """Load the model, and run a classifier on one blank image: its class logits must be as many
    as its class names (fewer names would label the wrong columns)."""
    try:
        model = load_model(uri)
        config = model.saved_config
        if config.class_names and CLASS_LOGITS in config.outputs:
            blank = torch.zeros(1, config.input_channels, *config.input_size)
            with torch.inference_mode():
                logits = model(blank)[CLASS_LOGITS]
            if logits.shape[1] != len(config.class_names):
                raise ValueError(
                    f"{logits.shape[1]} class logits but {len(config.class_names)} class names"
                )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelCheckError(f"{uri}: cannot be loaded: {reason}") from None


def _needs_its_segmenter(uri: str, config: SavedModelConfig) -> str:
    return (
        f"{uri}: {config.model} was trained on lesion ROIs cut from "
        f"{config.roi_source_size[0]}×{config.roi_source_size[1]} images; it runs only behind "
        "the segmenter that cuts them (give the segmenter and this model as the classifier)"
    )


def _read(uri: str) -> SavedModelConfig:
    try:
        return read_model_config(uri)
    except FileNotFoundError:
        raise ModelCheckError(f"{uri}: no saved model here (config.json not found)") from None
    except (ValueError, TypeError) as error:
        raise ModelCheckError(f"{uri}: unreadable config.json ({error})") from None
