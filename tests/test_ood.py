"""``skinray.ood``: the nearest-neighbour score, its threshold, its bank beside the weights, and
the classifier's features it reads."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from skinray.calibration import split_in_folds
from skinray.models import CLASS_LOGITS, FEATURES, create_model, load_model, save_model
from skinray.models.release import out_of_fold_pass_rate
from skinray.models.serialization import CONFIG_FILE
from skinray.ood import OOD_FILE, NearestNeighbourOOD, fit_ood, save_ood
from skinray.predict import Predictor


def _clusters(count: int, seed: int, centre: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    directions = torch.zeros(count, 32)
    directions[:, 0] = 1.0 + centre
    directions[:, 1] = centre * 3
    return directions + 0.1 * torch.randn(count, 32, generator=generator)


def test_the_threshold_passes_the_quantile_of_validation_and_flags_far_inputs():
    ood = fit_ood(_clusters(500, 0), _clusters(400, 1), k=5, bank_size=200, quantile=0.95)
    assert len(ood.bank) == 200
    assert torch.allclose(ood.bank.norm(dim=1), torch.ones(200))
    passed = (~ood.flags(ood.score(_clusters(400, 1)))).float().mean().item()
    assert 0.95 <= passed <= 0.96
    held_out = (~ood.flags(ood.score(_clusters(1000, 2)))).float().mean().item()
    assert held_out > 0.9
    assert ood.flags(ood.score(_clusters(50, 3, centre=-2.0))).all()
    # the score is a distance: with k = 1 the bank's own rows are at 0
    nearest = NearestNeighbourOOD(ood.bank, 1, ood.threshold, ood.quantile)
    assert nearest.score(ood.bank[:3] * 7).abs().max() < 1e-5


def test_the_out_of_fold_pass_rate_sets_each_folds_threshold_on_the_other_folds():
    scores = np.arange(40, dtype=float)  # fold of the odd-placed scores against the rest
    rate = out_of_fold_pass_rate(scores, 0.5, folds=2, seed=0)
    folds = split_in_folds(40, 2, seed=0)
    expected = [
        (scores[held] <= np.quantile(np.delete(scores, held), 0.5, method="higher")).sum()
        for held in folds
    ]
    assert rate == sum(expected) / 40
    # On its own images the threshold passes the quantile by construction; here it need not.
    assert 0 < rate < 1


def test_loading_the_ood_score_does_not_import_scipys_optimiser():
    # Every scoring actor imports skinray.ood to load a classifier's bank; scipy.optimize (what
    # release-time temperature fitting uses) would add 0.4–0.75 s to each actor's start.
    probe = "import sys, skinray.ood; print('scipy.optimize' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_an_untrained_quantile_is_refused():
    with pytest.raises(ValueError, match="quantile"):
        fit_ood(_clusters(10, 0), _clusters(10, 1), quantile=1.0)


def test_the_classifier_gives_its_timm_logits_and_the_features_under_them():
    torch.manual_seed(0)
    model = create_model("classifier", encoder="resnet18", num_classes=3, drop_rate=0.2).eval()
    x = torch.randn(2, 3, 64, 64)
    outputs = model(x)
    torch.testing.assert_close(outputs[CLASS_LOGITS], model.net(x))
    assert outputs[FEATURES].shape == (2, model.net.num_features)
    model.train()  # dropout sits between the features and the logits, as in timm's own forward
    torch.manual_seed(1)
    a = model(x)[CLASS_LOGITS]
    torch.manual_seed(1)
    torch.testing.assert_close(a, model.net(x))


def test_the_bank_ships_beside_the_weights_and_reaches_the_predictor(tmp_path):
    torch.manual_seed(0)
    model = create_model("classifier", encoder="resnet18", num_classes=3).eval()
    uri = str(tmp_path / "clf")
    save_model(model, uri, input_size=(48, 48), class_names=["a", "b", "c"])
    images = torch.randint(0, 256, (6, 3, 48, 48), dtype=torch.uint8)
    predictor = Predictor.load(uri)
    with torch.no_grad():
        features = predictor.model(predictor.model_input(images))[FEATURES]
    ood = fit_ood(features, features, k=2, bank_size=6, quantile=0.5)
    config = json.loads((tmp_path / "clf" / CONFIG_FILE).read_text())
    config["ood"] = save_ood(ood, uri)
    (tmp_path / "clf" / CONFIG_FILE).write_text(json.dumps(config))

    reloaded = Predictor.load(uri)
    assert reloaded.ood.threshold == pytest.approx(ood.threshold)
    scores = reloaded(images).ood_score
    torch.testing.assert_close(scores, ood.score(features), atol=2e-3, rtol=0)
    before = load_model(uri).saved_config.config_sha256
    # The entry is part of the config's hash: another bank, another model.
    assert before != load_model(uri).saved_config.replace(ood=None).config_sha256
    damaged = (tmp_path / "clf" / OOD_FILE).read_bytes()[:-2] + b"  "
    (tmp_path / "clf" / OOD_FILE).write_bytes(damaged)
    with pytest.raises(ValueError, match="does not match config.json"):
        load_model(uri)


def test_the_out_of_fold_pass_rate_keeps_each_lesion_in_one_fold():
    # Two images of each lesion, scored alike: with folds by image a lesion's twin would set the
    # threshold its other image is measured against.
    from skinray.calibration import split_in_folds
    from skinray.ood import quantile_threshold

    scores = np.repeat(np.random.default_rng(1).random(20), 2)
    lesions = np.repeat(np.arange(20), 2)
    passed = np.empty(40, bool)
    for held in split_in_folds(40, 2, seed=0, groups=lesions):
        assert len(set(lesions[held])) * 2 == len(held)  # whole lesions
        passed[held] = scores[held] <= quantile_threshold(np.delete(scores, held), 0.5)
    rate = out_of_fold_pass_rate(scores, 0.5, folds=2, seed=0, groups=lesions)
    assert rate == passed.mean() == 0.4
    assert out_of_fold_pass_rate(scores, 0.5, folds=2, seed=0) == 0.525  # folds by image
