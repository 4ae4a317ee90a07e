"""The training config is validated at the door, with errors that name the key and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from skinray.losses import LOSSES
from skinray.models import get_model_spec, list_models
from skinray.train.config import (
    ConfigError,
    apply_overrides,
    list_recipes,
    load_config,
    recipe_summary,
    smoke_test_config,
    validate,
)
from skinray.train.loop import should_stop_early

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "skinray" / "train" / "recipes"


def test_every_recipe_loads_and_names_a_registered_model_and_known_losses():
    recipes = list_recipes()
    assert {"unet_two_step", "classifier_two_step", "fcn_multiscale", "asnet", "clnet"} <= set(
        recipes
    )
    for recipe in recipes:
        config = load_config(recipe)
        assert config.model in list_models()
        for loss in (config.segmentation_loss, config.classification_loss):
            assert loss is None or loss in LOSSES


def test_recipes_carry_the_papers_hyperparameters():
    asnet = load_config("asnet")
    assert (asnet.optim.name, asnet.optim.lr, asnet.optim.schedule) == ("sgd", 0.01, "poly")
    assert asnet.optim.poly_power == 0.9 and asnet.batch_size == 12
    assert asnet.data.image_size == (192, 256)
    clnet = load_config("clnet")
    assert (clnet.optim.lr, clnet.optim.poly_power, clnet.optim.weight_decay) == (1e-4, 0.96, 5e-4)
    assert (clnet.classification_loss, clnet.segmentation_loss) == ("focal", "focal_dice")
    fcn = load_config("fcn_multiscale")
    assert (fcn.optim.name, fcn.optim.lr, fcn.batch_size, fcn.data.image_size) == (
        "sgd",
        1e-3,
        6,
        (384, 384),
    )
    coarse = load_config("mbdcnn_coarse_sn")
    assert coarse.segmentation_loss == get_model_spec("mbdcnn_coarse_sn").segmentation_loss


def test_every_recipe_states_clipping_precision_and_early_stopping():
    for recipe in list_recipes():
        raw = (RECIPES / f"{recipe}.yaml").read_text()
        assert "grad_clip_norm:" in raw and "precision:" in raw, recipe
        config = load_config(recipe)
        # None of the papers clips gradients or trains in mixed precision.
        assert config.optim.grad_clip_norm is None and config.precision == "fp32", recipe
    stopping = {r: load_config(r).early_stopping_patience for r in list_recipes()}
    # MB-DCNN (Sec. V-A) and the two-step segmenter (Sec. 4) stop early; the others run out.
    assert {r for r, patience in stopping.items() if patience} == {
        "mbdcnn_coarse_sn",
        "mbdcnn_mask_cn",
        "mbdcnn_enhanced_sn",
        "unet_two_step",
    }


def test_list_recipes_shows_every_setting_that_changes_a_result():
    result = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train.py"), "--list-recipes"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert set(list_recipes()) | {"mbdcnn", "two_step"} == set(lines)
    coarse = lines["mbdcnn_coarse_sn"]
    for shown in (
        "clip none",
        "fp32",
        "early stop 10 ep on val_jaccard",
        "shuffle on",
        "lr 0.0001",
    ):
        assert shown in coarse, (shown, coarse)
    assert "no early stop" in lines["asnet"] and "sgd lr 0.01 poly 0.9" in lines["asnet"]
    assert "clip 1.0, bf16" in recipe_summary(
        load_config("asnet", ["optim.grad_clip_norm=1.0", "precision=bf16"])
    )
    base = recipe_summary(load_config("asnet"))
    for changed in (
        "segmentation_loss=bce_dice",
        "optim.momentum=0.5",
        "model_kwargs.encoder=resnet18",
        "encoder_weights=/weights/resnet34.safetensors",
        "scaling.num_workers=2",  # the global batch is batch_size × workers
        "data.limit=100",
        "checkpoint.metric=val_loss",
        "max_steps_per_epoch=3",
    ):
        summary = recipe_summary(load_config("asnet", [changed]))
        assert summary != base and changed.rsplit("=")[1].rsplit("/")[-1] in summary, changed
    assert "seed 0, validated on the source's validation split;" in base
    held = recipe_summary(load_config("asnet", ["data.validation=holdout"]))
    assert "validated on a 0.15 hold-out (hold-out seed 0)" in held
    where = ["output=/elsewhere", "max_failures=5", "checkpoint.num_to_keep=4"]
    assert recipe_summary(load_config("asnet", where)) == base  # not what it learns


def _history(*scores: float) -> list[dict[str, float]]:
    return [{"epoch": i + 1, "val_jaccard": s} for i, s in enumerate(scores)]


@pytest.mark.parametrize(
    ("scores", "patience", "stop"),
    [
        ((0.5, 0.6, 0.55, 0.58), 2, True),  # best at epoch 2, two epochs without a better one
        ((0.5, 0.6, 0.55), 2, False),
        ((0.5, 0.6, 0.6, 0.6), 2, True),  # equal is not better
        ((0.5, 0.6, 0.55, 0.61), 2, False),
        ((0.5, 0.4, 0.3), None, False),  # no patience: never
    ],
)
def test_early_stopping_counts_epochs_since_the_best(scores, patience, stop):
    config = load_config("asnet", [f"early_stopping_patience={patience or 'null'}"])
    assert should_stop_early(_history(*scores), config) is stop


def test_early_stopping_on_a_metric_to_minimise():
    config = load_config(
        "asnet", ["early_stopping_patience=1", "checkpoint.metric=val_loss", "checkpoint.mode=min"]
    )
    rows = [{"val_loss": v} for v in (0.5, 0.4, 0.45)]
    assert should_stop_early(rows, config) is True
    assert should_stop_early(rows[:2], config) is False


def test_overrides_reach_nested_keys_and_parse_values_as_yaml():
    config = load_config("asnet", ["optim.lr=0.5", "epochs=3", "data.image_size=[64, 96]"])
    assert config.optim.lr == 0.5 and config.epochs == 3
    assert config.data.image_size == (64, 96)


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(
        ConfigError, match=r"optim\.lrr: unknown key; allowed keys here: name, lr"
    ) as caught:
        load_config("asnet", ["optim.lrr=0.1"])
    assert "did you mean 'lr'" in str(caught.value)


def test_bad_value_names_the_key():
    with pytest.raises(
        ConfigError, match=r"optim\.name: .*'adam', 'adamw' or 'sgd'.*got 'rmsprop'"
    ):
        load_config("asnet", ["optim.name=rmsprop"])
    with pytest.raises(ConfigError, match=r"epochs: .*greater than or equal to 1"):
        load_config("asnet", ["epochs=0"])


def test_unknown_model_and_loss_list_the_known_ones():
    with pytest.raises(ConfigError, match=r"model: unknown model 'segformer'; known models: asnet"):
        load_config("asnet", ["model=segformer"])
    with pytest.raises(
        ConfigError, match=r"segmentation_loss: unknown loss 'iou'; known losses: .*dice"
    ):
        load_config("asnet", ["segmentation_loss=iou"])


def test_model_kwargs_are_checked_against_the_model():
    with pytest.raises(
        ConfigError, match=r"model_kwargs \['widht'\] not taken by 'asnet'; it takes: encoder"
    ):
        load_config("asnet", ["model_kwargs.widht=3"])


def test_a_dataset_source_needs_a_root():
    with pytest.raises(ConfigError, match="data.root is required for data.source='isic2017'"):
        load_config("asnet", ["data.root=null"])


def test_a_checkpoint_metric_the_model_does_not_report_is_refused():
    # A classifier reports no Jaccard: every epoch would score alike, and the "best" checkpoint
    # would be whichever Ray kept first (epoch N-1 of N).
    with pytest.raises(
        ConfigError, match=r"checkpoint.metric 'val_jaccard': classifier does not report it"
    ):
        load_config("classifier_cpu", ["checkpoint.metric=val_jaccard"])
    with pytest.raises(ConfigError, match=r"'val_auc_mean': unet does not report it"):
        load_config("unet_two_step", ["checkpoint.metric=val_auc_mean"])
    assert load_config("classifier_cpu", ["checkpoint.metric=val_loss"]).checkpoint.mode


def test_class_names_of_a_fixed_data_set_must_be_its_own_in_its_order():
    # HAM10000's reader labels by its own list; other names would be saved against its labels.
    reordered = "[nv, akiec, bcc, bkl, df, mel, vasc]"
    with pytest.raises(ConfigError, match=r"ham10000's labels are \['akiec', 'bcc'"):
        load_config("classifier_cpu", [f"data.class_names={reordered}"])
    own = "[akiec, bcc, bkl, df, mel, nv, vasc]"
    assert load_config("classifier_cpu", [f"data.class_names={own}"]).data.class_names[0] == "akiec"


def test_missing_file_and_unknown_recipe_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="unknown recipe 'unet_3step'; recipes: asnet"):
        load_config("unet_3step")


def test_malformed_override_is_rejected():
    with pytest.raises(ConfigError, match="not key=value"):
        apply_overrides({}, ["epochs"])


@pytest.mark.parametrize("model", list_models())
def test_smoke_config_exists_for_every_model(model):
    config = smoke_test_config(model)
    assert config.data.source == "synthetic" and config.epochs == 2


def test_bf16_precision_autocasts_the_training_pass_on_cpu_too():
    import torch

    from skinray.train.loop import _autocast

    conv, x = torch.nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8)
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        config = load_config("segmenter_cpu", [f"precision={precision}"])
        with _autocast(config, torch.device("cpu")):
            assert conv(x).dtype == dtype


def test_the_hold_out_has_its_own_seed_apart_from_the_training_seed(tmp_path):
    # Runs of other training seeds are measured on the same validation images.
    from skinray.train.trainer import holdout_record, load_samples

    lines = ["image,label,group"] + [f"{i}.jpg,{i % 2},L{i // 2}" for i in range(80)]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")

    def drawn(*overrides: str) -> set[str]:
        data = [
            "model=classifier",
            "checkpoint.metric=val_loss",
            "data.source=manifest",
            f"data.root={tmp_path / 'm.csv'}",
        ]
        config = validate(apply_overrides({}, data + list(overrides)))
        return set(load_samples(config)[1].rows["image_uri"].to_pylist())

    assert drawn("seed=0") == drawn("seed=1")
    assert drawn("data.validation_seed=1") != drawn("data.validation_seed=0")
    config = validate(
        apply_overrides(
            {},
            ["model=classifier", "checkpoint.metric=val_loss", "seed=3", "data.validation_seed=1"],
        )
    )
    assert holdout_record(config)["seed"] == 1


def test_a_limited_run_trains_on_a_random_subset_drawn_with_its_seed():
    # The first 600 of ISIC 2017's training images, sorted by id, hold no seborrheic keratosis.
    from skinray.train.trainer import load_samples, with_absolute_paths

    def subset(*overrides: str):
        config = with_absolute_paths(load_config("segmenter_cpu", ["data.limit=600", *overrides]))
        return load_samples(config)[0].rows

    rows = subset()
    assert len(rows) == 600 and min(np.bincount(rows["label"].to_numpy(), minlength=3)) > 50
    assert rows["image_uri"].equals(subset()["image_uri"])
    assert not rows["image_uri"].equals(subset("seed=1")["image_uri"])


def test_several_workers_on_fractions_of_gpus_are_refused_at_the_door():
    from skinray.train.config import ScalingSettings

    for fraction in (0.5, 1.5):
        with pytest.raises(ValueError, match="DDP needs whole GPUs a worker"):
            ScalingSettings(num_workers=2, use_gpu=True, gpus_per_worker=fraction)
    assert ScalingSettings(num_workers=1, use_gpu=True, gpus_per_worker=0.5).gpus_per_worker == 0.5


def test_the_schedule_counts_the_steps_each_worker_takes():
    # Ray Train's equal shards drop the remainder and the loop drops each shard's short batch:
    # 2,000 images, batch 12, 8 workers give 20 steps a worker, where ceil(2000 / 8 / 12) said 21
    # and the poly schedule ended at 0.065 of its rate instead of 0.
    from skinray.train.config import OptimConfig
    from skinray.train.loop import batches_per_shard, lr_schedule

    assert batches_per_shard(2000, 8, 12) == 20 and batches_per_shard(2000, 1, 12) == 166
    optim = OptimConfig(name="sgd", lr=0.01, schedule="poly")
    last = 20 * 100 - 1  # the last step a worker takes in 100 epochs
    assert lr_schedule(optim, 20 * 100, 20)(last) < 0.01
    assert lr_schedule(optim, 21 * 100, 21)(last) > 0.05  # what ceil assumed


def test_a_shard_smaller_than_a_batch_is_refused_before_training():
    from skinray.train.config import smoke_test_config
    from skinray.train.trainer import check_shards

    config = smoke_test_config()
    config = config.model_copy(update={"batch_size": 8})
    config = config.model_copy(
        update={"scaling": config.scaling.model_copy(update={"num_workers": 6})}
    )
    with pytest.raises(ConfigError, match="40 training images over 6 workers leave each 6"):
        check_shards(config, 40)
    check_shards(config, 48)


def test_a_chain_whose_later_stage_cannot_fill_a_batch_is_refused_before_any_stage_trains(
    tmp_path,
):
    # 100 workers leave each 18 of ISIC 2017's training images: a batch for coarse-SN (16), not
    # for mask-CN (32). Refused at the door, coarse-SN would have trained first, for nothing.
    from skinray.train.staged import run_staged

    output = tmp_path / "mbdcnn"
    with pytest.raises(ConfigError, match="stage mask_cn: .* fewer than one batch of 32"):
        run_staged("mbdcnn", str(output), ["scaling.num_workers=100"])
    assert not output.exists()
