"""Staged training: one command runs a paper's chain of models, each stage resumable.

- ``mbdcnn`` (Xie et al.): coarse-SN; then mask-CN on the image + coarse-SN's lesion probability; then
  enhanced-SN, started from coarse-SN's weights, on the image + mask-CN's CAMs; finally the three are
  assembled into the ``mbdcnn`` chain and saved as ``<output>/model``.
- ``two_step`` (Innani et al.): the U-Net segmenter; then the ROI classifier on the ROIs the
  segmenter's predicted masks cut (``skinray.models.two_step``); the pair is saved as the
  ``two_step`` composite in ``<output>/model``, the same model as ``--segmenter <segmenter>
  --classifier <classifier>``.

Stage ``s`` writes to ``<output>/<s>``; a stage whose model is already saved there is skipped, so a
re-run after an interruption continues at the first unfinished stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from skinray import io
from skinray.models import load_model, save_model
from skinray.models.mbdcnn import MBDCNN
from skinray.models.serialization import CONFIG_FILE
from skinray.predict import Predictor
from skinray.train.config import TrainConfig, load_config, smoke_test_config

__all__ = ["STAGED", "Stage", "run_staged"]


@dataclass(frozen=True)
class Stage:
    name: str
    recipe: str  # recipe name; for --smoke-test, the model of the same name's smoke config
    model: str
    guidance: tuple[str, ...] = ()  # earlier stages whose models feed this one's extra channels
    roi_from: str | None = None  # earlier stage whose segmenter makes this one's ROIs
    init_from: str | None = None  # earlier stage whose weights start this one


STAGED: dict[str, tuple[Stage, ...]] = {
    "mbdcnn": (
        Stage("coarse_sn", "mbdcnn_coarse_sn", "mbdcnn_coarse_sn"),
        Stage("mask_cn", "mbdcnn_mask_cn", "mbdcnn_mask_cn", guidance=("coarse_sn",)),
        Stage(
            "enhanced_sn",
            "mbdcnn_enhanced_sn",
            "mbdcnn_enhanced_sn",
            guidance=("coarse_sn", "mask_cn"),
            init_from="coarse_sn",
        ),
    ),
    "two_step": (
        Stage("segmenter", "unet_two_step", "unet"),
        Stage("classifier", "classifier_two_step", "classifier", roi_from="segmenter"),
    ),
}


def _stage_config(
    stage: Stage, output: str, overrides: list[str], smoke: bool, model_uris: dict[str, str]
) -> TrainConfig:
    wired = [f"output={io.join(output, stage.name)}"]
    if stage.guidance:
        wired.append(f"data.guidance_models=[{', '.join(model_uris[g] for g in stage.guidance)}]")
    if stage.roi_from:
        wired += ["data.input=roi", f"data.roi_segmenter={model_uris[stage.roi_from]}"]
    if stage.init_from:
        wired.append(f"init_from={model_uris[stage.init_from]}")
    if smoke:
        return smoke_test_config(stage.model, overrides=[*overrides, *wired])
    return load_config(stage.recipe, [*overrides, *wired])


def run_staged(
    chain: str, output: str, overrides: list[str] | None = None, smoke: bool = False
) -> dict[str, str]:
    """Train every stage of ``chain`` not yet saved under ``output``; return stage → model URI."""
    from skinray.train.trainer import run_training

    if chain not in STAGED:
        raise ValueError(f"unknown staged recipe {chain!r}; staged recipes: {', '.join(STAGED)}")
    check_stage_shards(chain, output, overrides or [], smoke)
    model_uris: dict[str, str] = {}
    for stage in STAGED[chain]:
        config = _stage_config(stage, output, overrides or [], smoke, model_uris)
        model_uri = io.join(config.output, "model")
        if io.exists(io.join(model_uri, CONFIG_FILE)):
            print(f"stage {stage.name}: already trained ({model_uri}), skipped", flush=True)
        else:
            print(f"stage {stage.name}: training {config.model}", flush=True)
            model_uri = run_training(config).model_uri
        model_uris[stage.name] = model_uri
    model_uris[chain] = io.join(output, "model")
    if chain == "mbdcnn":
        _save_mbdcnn(model_uris)
    else:
        _save_two_step(model_uris)
    return model_uris


def check_stage_shards(chain: str, output: str, overrides: list[str], smoke: bool) -> None:
    """Every stage still to train gets a batch on each worker (``check_shards``), checked before
    the first trains: stages differ in data and batch (MB-DCNN's mask-CN takes 32 where coarse-SN
    takes 16), and a later stage refused would leave the earlier ones trained for nothing."""
    from skinray.train.config import ConfigError
    from skinray.train.trainer import check_shards, load_samples

    planned = {stage.name: io.join(output, stage.name, "model") for stage in STAGED[chain]}
    for stage in STAGED[chain]:
        if io.exists(io.join(planned[stage.name], CONFIG_FILE)):
            continue
        config = _stage_config(stage, output, overrides, smoke, planned)
        try:
            check_shards(config, len(load_samples(config)[0]))
        except ConfigError as error:
            raise ConfigError(f"stage {stage.name}: {error}") from None


def _save_mbdcnn(model_uris: dict[str, str]) -> None:
    stages = [load_model(model_uris[s.name]) for s in STAGED["mbdcnn"]]
    config = stages[0].saved_config
    save_model(
        MBDCNN.from_stages(*stages),
        model_uris["mbdcnn"],
        input_size=config.input_size,
        class_names=stages[1].saved_config.class_names,
        mask_threshold=config.mask_threshold,
        holdout=stages[1].saved_config.holdout,
    )


def _save_two_step(model_uris: dict[str, str]) -> None:
    segmenter, classifier = (
        load_model(model_uris["segmenter"]),
        load_model(model_uris["classifier"]),
    )
    pair = Predictor.pair(segmenter, classifier)  # the composite's settings are the pair's
    save_model(
        pair.model,
        model_uris["two_step"],
        input_size=pair.input_size,
        mean=pair.mean,
        std=pair.std,
        class_names=pair.class_names,
        mask_threshold=pair.mask_threshold,
        temperature=pair.temperature,
        test_time_flips=pair.test_time_flips,
        holdout=classifier.saved_config.holdout,
    )
