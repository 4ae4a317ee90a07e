"""One command trains MB-DCNN's three stages in order, and a re-run skips what is done."""

from __future__ import annotations

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
