"""Ray Train wiring: datasets in, ``TorchTrainer`` fit, the best checkpoint out as a saved model.

``run_training(config)`` is what ``jobs/train.py`` calls. It reads the sample tables (so a missing
dataset, an image without a mask or an unknown label fails here, before any worker starts), hands Ray
Data pipelines to ``TorchTrainer``, and after the fit writes the best checkpoint with ``save_model``,
``metrics.json`` and ``training_curve.png`` to ``config.output``.
"""

from __future__ import annotations

import hashlib
import io as stdio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import skinray
from skinray import io
from skinray.data.datasets import (
    DatasetError,
    SampleTable,
    group_digest,
    holdout_split,
    read_ham10000,
    read_isic2017,
    read_manifest,
    synthetic_samples,
)
from skinray.data.loading import TrainingRows, to_ray_dataset
from skinray.models import get_model_spec, save_model
from skinray.models.zoo import resolve_model
from skinray.train.checkpoint import read_checkpoint
from skinray.train.config import ConfigError, TrainConfig, changed_settings
from skinray.train.loop import (
    HEADLINE_METRICS,
    batches_per_shard,
    build_model,
    fault_injection_from_environment,
    train_func,
)
from skinray.train.roi_masks import cache_predicted_masks

__all__ = [
    "TrainingOutcome",
    "check_stage_inputs",
    "load_samples",
    "run_training",
    "training_curve_png",
]

#: Models whose extra input channels come from upstream models (MB-DCNN Sec. III-B, III-C).
GUIDED_MODELS = frozenset({"mbdcnn_mask_cn", "mbdcnn_enhanced_sn"})


@dataclass(frozen=True)
class TrainingOutcome:
    model_uri: str
    best_metrics: dict[str, float]
    history: list[dict[str, float]]
    best_checkpoint: str
    wall_time_s: float


def load_samples(config: TrainConfig) -> tuple[SampleTable, SampleTable]:
    """(training, validation) sample tables as the config asks."""
    data = config.data
    spec = get_model_spec(config.model)
    if data.source == "synthetic":
        num_classes = len(data.class_names) if data.class_names else 3
        samples = synthetic_samples(data.synthetic_count, num_classes=num_classes, seed=config.seed)
        validation = None
    elif data.source == "isic2017":
        samples = read_isic2017(data.root, "Training")
        validation = read_isic2017(data.root, "Validation") if data.validation == "split" else None
    elif data.source == "ham10000":
        if data.validation == "split":
            raise DatasetError("HAM10000 has no validation split here: use data.validation=holdout")
        samples, validation = read_ham10000(data.root), None
    else:
        samples = read_manifest(data.root, data.class_names, require_masks=spec.segments)
        validation = (
            read_manifest(
                data.validation_manifest, samples.class_names, require_masks=spec.segments
            )
            if data.validation == "split"
            else None
        )
    if validation is None:
        samples, validation = holdout_split(samples, data.validation_fraction, data.validation_seed)
    if data.limit is not None:
        samples = samples.random_subset(data.limit, config.seed)
    return samples, validation


def with_absolute_paths(config: TrainConfig) -> TrainConfig:
    """The config with every local path absolute, as the driver sees it: the workers read encoder
    weights and stage models from another working directory."""
    data = config.data

    def absolute(uri: str | None) -> str | None:
        return None if uri is None else io.absolute(uri)

    def model(uri: str | None) -> str | None:  # a released model's short name, or a path
        return None if uri is None else io.absolute(resolve_model(uri))

    return config.model_copy(
        update={
            "encoder_weights": absolute(config.encoder_weights),
            "resume": absolute(config.resume),
            "data": data.model_copy(
                update={
                    "root": absolute(data.root),
                    "validation_manifest": absolute(data.validation_manifest),
                    "roi_segmenter": model(data.roi_segmenter),
                    "guidance_models": tuple(model(m) for m in data.guidance_models),
                }
            ),
        }
    )


def _storage(config: TrainConfig) -> tuple[str, Any]:
    path = config.storage_path or io.join(config.output, "ray")
    if path.startswith("s3://"):
        return path.removeprefix("s3://"), io.s3_filesystem()
    return str(Path(path).expanduser().resolve()), None


#: Beside a run's outputs, the settings its Ray Train run started with (``check_run_folder``).
RUN_RECORD = "training_run.json"


#: Settings a continued run may change: how it recovers, not what it learns (``resume`` may be
#: dropped: the first attempt's is in the checkpoints the run continues from).
_CONTINUABLE = frozenset({"max_failures", "resume", "checkpoint.num_to_keep"})


def run_name(config: TrainConfig) -> str:
    """The Ray Train run's name in its storage: ``train`` under the output's own ``ray/``; under
    a ``storage_path`` shared by several outputs (a staged chain's stages), one per output."""
    if config.storage_path is None:
        return "train"
    return "train-" + hashlib.sha256(io.absolute(config.output).encode()).hexdigest()[:12]


def run_folder(config: TrainConfig, name: str) -> str:
    """The URI of the Ray Train run ``name`` in the config's storage."""
    return io.join(config.storage_path or io.join(config.output, "ray"), name)


def check_run_folder(config: TrainConfig, name: str) -> None:
    """Ray Train continues a run already in ``<storage>/<name>`` from its last checkpoint (how a
    restarted driver recovers): its weights, optimiser, learning rate and epoch, whatever this
    config says, and it picks the best checkpoint among that run's too. So the folder may hold
    only a run of these settings (``RUN_RECORD``), ``_CONTINUABLE`` ones aside."""
    where = run_folder(config, name)
    if not io.exists(where):
        return
    record = io.join(config.output, RUN_RECORD)
    earlier = json.loads(io.read_bytes(record)) if io.exists(record) else None
    now = config.model_dump(mode="json")
    changed = sorted(set(changed_settings(earlier, now)) - _CONTINUABLE)
    if earlier is not None and config.resume not in (None, earlier.get("resume")):
        changed.append("resume")  # asked to resume from elsewhere than that run did
    if earlier is not None and not changed:
        print(f"continuing the training run in {where} from its last checkpoint", flush=True)
        return
    if earlier is None:
        why = f"no {RUN_RECORD} in {config.output} says what it ran"
    else:
        why = f"settings differ: {', '.join(changed[:5])}"
    instead = (
        f"instead of resuming from {config.resume}" if config.resume else "in place of this one"
    )
    raise ConfigError(
        f"{where} holds a training run of other settings ({why}), which Ray would continue "
        f"{instead}: give another output, or remove that run"
    )


def run_training(config: TrainConfig, name: str | None = None) -> TrainingOutcome:
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    started, commit = time.perf_counter(), skinray.code_commit()
    config = with_absolute_paths(config)
    check_stage_inputs(config)
    name = name or run_name(config)
    check_run_folder(config, name)
    # Bad paths, images without masks and unknown labels fail here, before Ray starts anything.
    train_samples, validation_samples = load_samples(config)
    check_shards(config, len(train_samples))
    if config.data.input == "roi" and config.data.roi_masks == "cached":
        train_samples = cache_predicted_masks(
            train_samples,
            config.data.roi_segmenter,
            config.data.image_size,
            io.absolute(config.output),  # the workers read the masks
        )
    if not ray.is_initialized():
        ray.init()  # the cluster in RAY_ADDRESS (as under `ray job submit`), or a local one
    # Per-epoch lines from the workers are the progress to follow; Ray Data's bars for the
    # training and validation reads (re-run every epoch) would bury them.
    ray.data.DataContext.get_current().enable_progress_bars = False
    class_names = list(config.data.class_names or train_samples.class_names)
    storage_path, storage_filesystem = _storage(config)
    resources = {"CPU": config.scaling.cpus_per_worker}
    if config.scaling.use_gpu:
        resources["GPU"] = config.scaling.gpus_per_worker
    trainer = TorchTrainer(
        train_func,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "class_names": class_names,
            "class_counts": np.bincount(
                train_samples.rows["label"].to_numpy(), minlength=len(class_names)
            ).tolist(),
            "train_count": len(train_samples),
            "fault_injection": fault_injection_from_environment(),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.scaling.num_workers,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker=resources,
        ),
        datasets={
            "train": TrainingRows(
                train_samples,
                config.data.image_size,
                config.seed if config.data.shuffle else None,
                run_folder=run_folder(config, name),
                resume=config.resume,
            ),
            "validation": to_ray_dataset(validation_samples, config.data.image_size),
        },
        dataset_config=_data_config(),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.checkpoint.num_to_keep,
                checkpoint_score_attribute=config.checkpoint.metric,
                checkpoint_score_order=config.checkpoint.mode,
            ),
        ),
    )
    io.write_bytes(io.join(config.output, RUN_RECORD), config.model_dump_json(indent=2).encode())
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    scored = result.best_checkpoints or [(result.checkpoint, result.metrics)]
    best_checkpoint, best_metrics = scored[0]
    if len(scored) > 1:
        sign = 1 if config.checkpoint.mode == "max" else -1
        best_checkpoint, best_metrics = max(
            scored, key=lambda pair: sign * pair[1].get(config.checkpoint.metric, float("-inf"))
        )
    model = build_model(config, len(class_names))
    with result.checkpoint.as_directory() as directory:
        history = read_checkpoint(directory).history  # the latest has the whole run's history
    with best_checkpoint.as_directory() as directory:
        read_checkpoint(directory, model)
    model_uri = io.join(config.output, "model")
    save_model(model.eval(), model_uri, **_saved_settings(config, class_names))
    wall_time_s = time.perf_counter() - started
    summary = {
        "model": config.model,
        "model_uri": model_uri,
        "best_checkpoint": best_checkpoint.path,
        "selected_by": {config.checkpoint.metric: best_metrics.get(config.checkpoint.metric)},
        "best_metrics": best_metrics,
        "history": history,
        "class_names": class_names,
        "train_images": len(train_samples),
        "validation_images": len(validation_samples),
        "wall_time_s": wall_time_s,
        "commit": commit,
        "config": config.model_dump(mode="json"),
    }
    io.write_bytes(io.join(config.output, "metrics.json"), json.dumps(summary, indent=2).encode())
    io.write_bytes(io.join(config.output, "training_curve.png"), training_curve_png(history))
    return TrainingOutcome(model_uri, best_metrics, history, best_checkpoint.path, wall_time_s)


def _data_config():
    """Ray Train's ingest with ``preserve_order``: the decode tasks may finish in any order, and
    without it a seeded shuffle would not give the same batches twice."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(datasets_to_split=["train"], execution_options=options)


def check_shards(config: TrainConfig, train_count: int) -> None:
    """Each worker's shard must hold a batch: one that does not would train nothing, silently."""
    workers = config.scaling.num_workers
    if batches_per_shard(train_count, workers, config.batch_size) < 1:
        raise ConfigError(
            f"{train_count} training images over {workers} workers leave each "
            f"{train_count // workers}, fewer than one batch of {config.batch_size} "
            "(batch_size is per worker): use fewer workers or a smaller batch"
        )


def check_stage_inputs(config: TrainConfig) -> None:
    """A stage whose model input needs upstream models names them: a ROI classifier its segmenter,
    a model with guidance channels its guidance chain (ground truth never stands in)."""
    data = config.data
    if data.input == "roi" and not data.roi_segmenter:
        raise ConfigError(
            "data.input=roi needs data.roi_segmenter (a saved segmenter): the classifier trains "
            "and is validated on the ROIs a segmenter predicts, never on ground-truth masks"
        )
    accepted = get_model_spec(config.model).accepted_kwargs()
    channels = config.model_kwargs.get("in_chans", accepted.get("in_chans", 3))
    guided = config.model in GUIDED_MODELS or (isinstance(channels, int) and channels > 3)
    if guided and not data.guidance_models:
        raise ConfigError(
            f"{config.model} takes guidance channels: set data.guidance_models to the saved "
            "upstream models (or train the chain with `jobs/train.py mbdcnn`)"
        )


def holdout_record(config: TrainConfig) -> dict[str, Any] | None:
    """The validation hold-out ``load_samples`` draws from the run's data (``source``, ``root``,
    ``fraction``, ``seed``, and for HAM10000 or a manifest ``groups_sha256``, the digest of the
    lesions it is drawn from), as a saved model records it for evaluation to draw again; None
    where the run validates on a split of its own."""
    data = config.data
    if data.validation != "holdout":
        return None
    record = {
        "source": data.source,
        "root": data.root,  # absolute in a run (with_absolute_paths): a manifest's is its URI
        "fraction": data.validation_fraction,
        "seed": data.validation_seed,
    }
    if data.source == "ham10000":
        record["groups_sha256"] = group_digest(read_ham10000(data.root))
    elif data.source == "manifest":
        record["groups_sha256"] = group_digest(read_manifest(data.root, data.class_names))
    return record


def _saved_settings(config: TrainConfig, class_names: list[str]) -> dict[str, Any]:
    settings: dict[str, Any] = {"input_size": config.data.image_size, "class_names": class_names}
    holdout = holdout_record(config)
    if holdout is not None:
        settings["holdout"] = holdout
    if config.data.input == "roi":
        settings.update(
            input_size=config.data.roi_size or config.data.image_size,
            roi_margin=config.data.roi_margin,
            roi_source_size=config.data.image_size,
        )
    return settings


def training_curve_png(history: list[dict[str, float]]) -> bytes:
    """Loss (train, validation) and validation metrics per epoch, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [row["train_loss"] for row in history], marker="o", label="train")
    loss_axis.plot(epochs, [row["val_loss"] for row in history], marker="o", label="validation")
    loss_axis.set(xlabel="epoch", ylabel="loss", title="Loss")
    loss_axis.legend()
    for key in HEADLINE_METRICS:
        if history and key in history[0]:
            metric_axis.plot(epochs, [row[key] for row in history], marker="o", label=key[4:])
    metric_axis.set(xlabel="epoch", title="Validation", ylim=(0, 1))
    metric_axis.legend()
    for axis in (loss_axis, metric_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    buffer = stdio.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()
