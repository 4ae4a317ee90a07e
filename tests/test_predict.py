"""``skinray.predict``: the steps around a network, each checked against doing it by hand, and the
door checks on saved models."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from skinray.data.synthetic import synthetic_batch, synthetic_sample
from skinray.data.transforms import normalise
from skinray.models import CAM, MASK_LOGITS, create_model, get_model_spec, load_model, save_model
from skinray.models.mbdcnn import normalise_cam
from skinray.predict import ModelCheckError, Predictor, check_models

SIZE = 64
CLASSES = ["a", "b", "c"]


def _saved(name: str, folder, **extra) -> str:
    torch.manual_seed(0)
    model = create_model(name, **get_model_spec(name).smoke_kwargs, **extra)
    classes = CLASSES if get_model_spec(name).classifies else None
    save_model(model, str(folder / name), input_size=(SIZE, SIZE), class_names=classes)
    return str(folder / name)


def _images(count: int = 2) -> torch.Tensor:
    images, _, _ = synthetic_batch(count, SIZE)
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def _guided(name: str, chain: list[str], folder) -> Predictor:
    model = load_model(_saved(name, folder))
    return Predictor.from_saved(model, guidance=[load_model(uri) for uri in chain])


def test_mask_cn_gets_coarse_sns_lesion_probability_as_its_fourth_channel(tmp_path):
    coarse = _saved("mbdcnn_coarse_sn", tmp_path)
    predictor = _guided("mbdcnn_mask_cn", [coarse], tmp_path)
    images = _images()
    x = predictor.model_input(images)
    segmenter = load_model(coarse)
    config = segmenter.saved_config
    with torch.no_grad():
        probability = torch.sigmoid(
            segmenter(normalise(images, config.mean, config.std))[MASK_LOGITS]
        )
    assert x.shape == (2, 4, SIZE, SIZE)
    assert torch.equal(x[:, 3:], probability)
    assert torch.equal(x[:, :3], normalise(images, predictor.mean, predictor.std))


def test_enhanced_sn_gets_mask_cns_normalised_cams(tmp_path):
    coarse, mask_cn = _saved("mbdcnn_coarse_sn", tmp_path), _saved("mbdcnn_mask_cn", tmp_path)
    predictor = _guided("mbdcnn_enhanced_sn", [coarse, mask_cn], tmp_path)
    images = _images()
    guidance = predictor.model_input(images)[:, 3:]
    first, second = load_model(coarse), load_model(mask_cn)
    with torch.no_grad():
        x = normalise(images, first.saved_config.mean, first.saved_config.std)
        probability = torch.sigmoid(first(x)[MASK_LOGITS])
        x = normalise(images, second.saved_config.mean, second.saved_config.std)
        cams = second(torch.cat([x, probability], 1))[CAM]
    assert guidance.shape == (2, 3, SIZE, SIZE)
    assert torch.allclose(guidance, normalise_cam(cams, (SIZE, SIZE)), atol=1e-6)
    assert guidance.min() >= 0 and guidance.max() <= 1


def test_prediction_is_sigmoid_threshold_softmax_and_the_predicted_classs_cam(tmp_path):
    predictor = Predictor.load(_saved("mbdcnn", tmp_path))
    images = _images(3)
    prediction = predictor(images)
    with torch.no_grad():
        raw = predictor.model(normalise(images, predictor.mean, predictor.std))
    probability = torch.sigmoid(raw[MASK_LOGITS][:, 0])
    assert torch.allclose(prediction.mask_probability, probability)
    assert torch.equal(prediction.mask, (probability > 0.5).to(torch.uint8))
    classes = torch.softmax(raw["class_logits"], 1)
    assert torch.allclose(prediction.class_probabilities, classes)
    picked = classes.argmax(1)
    assert torch.equal(prediction.cam, raw[CAM][torch.arange(3), picked])
    assert prediction.roi_box is None


def test_images_of_any_size_are_resized_as_decoding_resizes_them(tmp_path):
    predictor = Predictor.load(_saved("unet", tmp_path))
    sources = [synthetic_sample(i, size).image for i, size in enumerate([(90, 120), (64, 64)])]
    batch = predictor.as_batch(sources)
    expected = cv2.resize(sources[0], (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    assert batch.shape == (2, 3, SIZE, SIZE) and batch.dtype == torch.uint8
    assert np.array_equal(batch[0].permute(1, 2, 0).numpy(), expected)
    assert np.array_equal(batch[1].permute(1, 2, 0).numpy(), sources[1])


def test_the_mask_threshold_comes_from_the_saved_model(tmp_path):
    torch.manual_seed(0)
    model = create_model("unet", **get_model_spec("unet").smoke_kwargs)
    save_model(model, str(tmp_path / "m"), input_size=(SIZE, SIZE), mask_threshold=0.9)
    prediction = Predictor.load(str(tmp_path / "m"))(_images())
    assert torch.equal(prediction.mask, (prediction.mask_probability > 0.9).to(torch.uint8))


def test_check_models_refuses_what_cannot_serve_with_the_directory_named(tmp_path):
    classifier = _saved("classifier", tmp_path)
    with pytest.raises(ModelCheckError, match=f"{classifier}: classifier has no mask output"):
        check_models(classifier)
    assert check_models(classifier, segments=False)[0].model == "classifier"
    segmenter = _saved("unet", tmp_path)
    with pytest.raises(ModelCheckError, match=f"{segmenter}: unet has no class output"):
        check_models(segmenter, segmenter)
    guided = _saved("mbdcnn_mask_cn", tmp_path)
    with pytest.raises(ModelCheckError, match="4 input channels"):
        check_models(guided, segments=False)
    with pytest.raises(ModelCheckError, match="no saved model here"):
        check_models(str(tmp_path / "nothing"))
    config = json.loads((tmp_path / "classifier" / "config.json").read_text())
    (tmp_path / "classifier" / "config.json").write_text(
        json.dumps({**config, "class_names": None})
    )
    with pytest.raises(ModelCheckError, match="class logits but no class names"):
        check_models(segmenter, classifier)
    (tmp_path / "classifier" / "config.json").write_text(
        json.dumps({**config, "input_size": [0, 64]})
    )
    with pytest.raises(ModelCheckError, match="input_size"):
        check_models(segmenter, classifier)


def test_a_classifier_of_lesion_rois_is_refused_without_its_segmenter(tmp_path):
    # Fed the whole image, it would be measured on a path scoring never runs.
    torch.manual_seed(0)
    classifier = create_model("classifier", encoder="resnet18", num_classes=3)
    uri = str(tmp_path / "roi")
    save_model(
        classifier, uri, input_size=(48, 48), class_names=["a", "b", "c"], roi_source_size=(64, 64)
    )
    for refused in (lambda: check_models(uri, segments=False), lambda: Predictor.load(uri)):
        with pytest.raises(ModelCheckError, match=f"{uri}: classifier was trained on lesion ROIs"):
            refused()
    segmenter = _saved("unet", tmp_path)
    assert check_models(segmenter, uri)[1].roi_source_size == (64, 64)
    assert Predictor.load(segmenter, uri).input_size == (64, 64)


def test_test_time_flips_average_the_logits_over_the_image_and_its_flips(tmp_path):
    uri = _saved("clnet", tmp_path)
    images = _images(2)
    plain = Predictor.load(uri)
    x = plain.model_input(plain.as_batch(images))
    with torch.inference_mode():
        passes = [
            plain.model(x),
            {k: v.flip(-1) if k == MASK_LOGITS else v for k, v in plain.model(x.flip(-1)).items()},
            {k: v.flip(-2) if k == MASK_LOGITS else v for k, v in plain.model(x.flip(-2)).items()},
        ]
    flipped = Predictor.load(uri)
    flipped.test_time_flips = True
    with torch.inference_mode():
        outputs, prediction = flipped.run(images)
    for key in (MASK_LOGITS, "class_logits"):
        expected = sum(p[key] for p in passes) / 3
        torch.testing.assert_close(outputs[key], expected, rtol=1e-5, atol=1e-5)
    assert prediction.class_probabilities is not None and prediction.mask is not None
    assert not torch.allclose(outputs[MASK_LOGITS], passes[0][MASK_LOGITS])


def test_a_whole_image_classifier_in_a_pair_sees_the_whole_image_as_in_training(tmp_path):
    # A classifier saved without roi_source_size was trained on whole images: paired with a
    # segmenter, it must give the probabilities it gives alone, and the pair decodes at its size.
    torch.manual_seed(0)
    segmenter_uri = _saved("unet", tmp_path)
    classifier = create_model("classifier", **get_model_spec("classifier").smoke_kwargs)
    save_model(classifier, str(tmp_path / "whole"), input_size=(48, 80), class_names=CLASSES)
    alone = Predictor.load(str(tmp_path / "whole"))
    pair = Predictor.load(segmenter_uri, str(tmp_path / "whole"))
    assert pair.input_size == (48, 80) and pair.model.classifier_input == "image"
    images = [synthetic_sample(seed, (120, 200)).image for seed in range(3)]
    together, apart = pair(images), alone(images)
    assert together.roi_box is None and together.mask.shape == (3, 48, 80)
    torch.testing.assert_close(together.class_probabilities, apart.class_probabilities)


def test_a_classifier_saved_with_test_time_flips_keeps_them_in_a_pair(tmp_path):
    # The pair is what scoring, evaluate --classifier and the release measure: a classifier
    # released with flips must give in it the flip-averaged probabilities it gives alone.
    torch.manual_seed(0)
    segmenter_uri = _saved("unet", tmp_path)
    classifier = create_model("classifier", **get_model_spec("classifier").smoke_kwargs)
    uri = str(tmp_path / "flipped")
    save_model(classifier, uri, input_size=(48, 80), class_names=CLASSES, test_time_flips=True)
    alone, pair = Predictor.load(uri), Predictor.load(segmenter_uri, uri)
    assert pair.test_time_flips
    images = [synthetic_sample(seed, (120, 200)).image for seed in range(3)]
    together, apart = pair(images), alone(images)
    torch.testing.assert_close(together.class_probabilities, apart.class_probabilities)
    assert together.flip_disagreement is not None


def test_an_roi_classifier_in_a_pair_gets_the_lesion_box(tmp_path):
    segmenter_uri = _saved("unet", tmp_path)
    classifier = create_model("classifier", **get_model_spec("classifier").smoke_kwargs)
    save_model(
        classifier,
        str(tmp_path / "roi"),
        input_size=(48, 48),
        class_names=CLASSES,
        roi_source_size=(96, 96),
    )
    pair = Predictor.load(segmenter_uri, str(tmp_path / "roi"))
    assert pair.input_size == (96, 96) and pair.model.classifier_input == "roi"
    assert pair(_images(2)).roi_box.shape == (2, 4)
