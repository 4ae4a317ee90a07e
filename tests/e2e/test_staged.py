"""One command trains a paper's chain of stages in order, and a re-run skips what is done."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from skinray.models import CAM, CLASS_LOGITS, MASK_LOGITS, load_model
from skinray.train.staged import run_staged


def test_mbdcnn_chain_trains_each_stage_once_and_assembles(ray_cluster, tmp_path, capsys):
    output = str(tmp_path / "mbdcnn")
    models = run_staged("mbdcnn", output, ["epochs=1", "data.synthetic_count=24"], smoke=True)
    assert set(models) == {"coarse_sn", "mask_cn", "enhanced_sn", "mbdcnn"}
    mask_cn = load_model(models["mask_cn"])
    assert mask_cn.saved_config.input_channels == 4
    enhanced = load_model(models["enhanced_sn"])
    assert enhanced.saved_config.input_channels == 6

    chain = load_model(models["mbdcnn"])
    with torch.no_grad():
        out = chain(torch.zeros(1, 3, 64, 64))
    assert out[MASK_LOGITS].shape == (1, 1, 64, 64)
    assert out[CLASS_LOGITS].shape == (1, 3) and out[CAM].shape[:2] == (1, 3)
    # The assembled chain holds the trained stages' weights.
    for stage in ("coarse_sn", "mask_cn", "enhanced_sn"):
        trained = load_model(models[stage]).state_dict()
        for key, value in getattr(chain, stage).state_dict().items():
            assert torch.equal(value, trained[key]), (stage, key)

    capsys.readouterr()
    again = run_staged("mbdcnn", output, ["epochs=1", "data.synthetic_count=24"], smoke=True)
    assert again == models
    printed = capsys.readouterr().out
    assert printed.count("already trained") == 3 and "training" not in printed


def test_two_step_chain_trains_the_roi_classifier_on_its_segmenter_and_saves_the_pair(
    ray_cluster, tmp_path
):
    from skinray.data.synthetic import synthetic_batch
    from skinray.predict import Predictor

    output = str(tmp_path / "two_step")
    overrides = [
        "epochs=1",
        "data.synthetic_count=24",
        "data.roi_size=[48, 48]",
        "data.roi_masks=cached",
    ]
    models = run_staged("two_step", output, overrides, smoke=True)
    assert set(models) == {"segmenter", "classifier", "two_step"}
    # the training ROIs came from the segmenter's masks, predicted once per training image
    (cache,) = (Path(output) / "classifier" / "roi-masks").iterdir()
    trained = json.loads((Path(output) / "classifier" / "metrics.json").read_text())
    assert len(list(cache.glob("*.png"))) == trained["train_images"] > 0
    classifier = load_model(models["classifier"]).saved_config
    assert classifier.input_size == (48, 48) and classifier.roi_source_size == (64, 64)
    assert classifier.roi_margin == 0.1

    images, _, _ = synthetic_batch(4, 64, seed=5)
    pair = Predictor.load(models["segmenter"], models["classifier"])(list(images))
    composite = Predictor.load(models["two_step"])(list(images))
    assert torch.equal(pair.mask, composite.mask)
    assert torch.allclose(pair.class_probabilities, composite.class_probabilities, atol=1e-6)
    assert torch.equal(pair.roi_box, composite.roi_box)
