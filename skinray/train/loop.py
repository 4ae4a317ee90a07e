"""The per-worker training loop that Ray Train runs (``train_func``), in small named steps.

Each worker builds the model, restores a checkpoint when there is one (after a lost worker Ray Train
hands back the last reported checkpoint; ``--resume`` names one explicitly), trains on its shard of the
training set, and every epoch rank 0 validates on the whole validation set and every worker reports,
rank 0 with a checkpoint.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors

from skinray import io
from skinray.data.transforms import augment_batch, augmentation
from skinray.evaluation import Evaluator
from skinray.losses import LOSSES, class_weights
from skinray.models import CLASS_LOGITS, MASK_LOGITS, create_model, get_model_spec, load_model
from skinray.models.serialization import WEIGHTS_FILE
from skinray.models.two_step import TwoStep
from skinray.predict import Predictor
from skinray.train.checkpoint import TrainingState, read_checkpoint, write_checkpoint
from skinray.train.config import OptimConfig, TrainConfig

__all__ = [
    "StagePredictor",
    "build_model",
    "build_optimizer",
    "fault_injection_from_environment",
    "lr_schedule",
    "should_stop_early",
    "train_func",
]

#: Validation figures shown per epoch and drawn in the training curve, where a model has them.
HEADLINE_METRICS = (
    "val_jaccard",
    "val_dice",
    "val_threshold_jaccard",
    "val_auc_mean",
    "val_balanced_accuracy",
)

# Fault injection for the recovery test: the worker of this rank exits hard (as a crashed or
# preempted process would) at the start of this epoch, once, leaving a marker file behind.
KILL_AT_EPOCH_ENV = "SKINRAY_TEST_KILL_WORKER_AT_EPOCH"
KILL_MARKER_ENV = "SKINRAY_TEST_KILL_WORKER_MARKER"


def build_model(config: TrainConfig, num_classes: int) -> torch.nn.Module:
    spec = get_model_spec(config.model)
    kwargs = dict(config.model_kwargs)
    accepted = spec.accepted_kwargs()
    if "num_classes" in accepted:
        kwargs.setdefault("num_classes", num_classes)
    if config.encoder_weights is not None:
        if "encoder_weights" not in accepted:
            raise ValueError(f"model {config.model!r} takes no encoder_weights")
        kwargs["encoder_weights"] = config.encoder_weights
    return create_model(config.model, **kwargs)


def build_optimizer(optim: OptimConfig, parameters) -> torch.optim.Optimizer:
    if optim.name == "sgd":
        return torch.optim.SGD(
            parameters, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay
        )
    if optim.name == "adamw":
        return torch.optim.AdamW(parameters, lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.Adam(parameters, lr=optim.lr, weight_decay=optim.weight_decay)


def batches_per_shard(train_count: int, world: int, batch_size: int) -> int:
    """The optimiser steps each worker takes in an epoch: Ray Train splits the training rows into
    ``world`` equal shards (``streaming_split(equal=True)``: the remainder is dropped), and the
    loop drops each shard's last short batch."""
    return (train_count // world) // batch_size


def lr_schedule(optim: OptimConfig, total_steps: int, steps_per_epoch: int):
    """The learning rate's factor at each iteration: linear warm-up, then poly (ASNet Sec. 2.5,
    CLNet Sec. 3.1), cosine or constant over the remaining steps."""
    warmup = round(optim.warmup_epochs * steps_per_epoch)
    decay_steps = max(1, total_steps - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / decay_steps)
        if optim.schedule == "poly":
            return (1 - progress) ** optim.poly_power
        if optim.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


def fault_injection_from_environment() -> dict[str, str] | None:
    """Read on the driver and passed to the workers in the loop config (tests set it)."""
    if KILL_AT_EPOCH_ENV in os.environ and KILL_MARKER_ENV in os.environ:
        return {"epoch": os.environ[KILL_AT_EPOCH_ENV], "marker": os.environ[KILL_MARKER_ENV]}
    return None


def _kill_if_asked(fault: dict[str, str] | None, epoch: int, rank: int) -> None:
    if not fault or int(fault["epoch"]) != epoch or rank != 1 or Path(fault["marker"]).exists():
        return
    marker = fault["marker"]
    Path(marker).write_text(f"worker rank {rank} killed at epoch {epoch}\n")
    os._exit(1)


class StagePredictor:
    """The model under training inside the ``Predictor`` its stage is validated through, and the
    training inputs cut by that same predictor: guidance channels from the chain's saved models
    (MB-DCNN's later stages), or ROIs from the saved segmenter's predicted masks (the two-step
    classifier). Ground truth never enters a model input here."""

    def __init__(self, config: TrainConfig, model, class_names, device) -> None:
        data, mean_std = config.data, model.normalization
        self.roi, flips = None, False
        self.cached_roi_masks = data.input == "roi" and data.roi_masks == "cached"
        if data.input == "roi":
            segmenter = load_model(data.roi_segmenter, device=device)
            seg = segmenter.saved_config
            self.roi = TwoStep.from_stages(
                segmenter,
                model,
                segmenter_input_size=seg.input_size,
                classifier_input_size=data.roi_size or data.image_size,
                mask_threshold=seg.mask_threshold,
                roi_margin=data.roi_margin,
                segmenter_normalization=(seg.mean, seg.std),
            ).to(device)
            model, mean_std = self.roi, (seg.mean, seg.std)
            flips = seg.test_time_flips  # the pair flips as a whole, as Predictor.pair does
        guidance = [load_model(uri, device=device) for uri in data.guidance_models]
        self.predictor = Predictor(
            model,
            input_size=data.image_size,
            mean=mean_std[0],
            std=mean_std[1],
            class_names=class_names,
            guidance=guidance,
            test_time_flips=flips,
            source=f"training {config.model}",
        )

    def train_input(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """uint8 images (N,3,H,W), augmented, → the input of the network being trained. ``masks``
        (augmented with them) are the segmenter's cached predictions with ``roi_masks: cached``,
        and are not used otherwise."""
        x = self.predictor.model_input(images)
        if self.roi is not None:
            lesion = masks.bool() if self.cached_roi_masks else None
            with torch.no_grad():
                x, _ = self.roi.roi_input(x, lesion=lesion)
        return x


def initialise_from(model: torch.nn.Module, uri: str) -> None:
    """Copy a saved model's weights into ``model`` where names match; all of them must fit."""
    state = load_safetensors(io.read_bytes(io.join(uri, WEIGHTS_FILE)))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(
            f"init_from {uri}: {len(result.unexpected_keys)} weights have no place in "
            f"{model.skinray_model_name}, e.g. {result.unexpected_keys[:3]}"
        )


class _Objective:
    def __init__(self, config: TrainConfig, class_counts: list[int] | None = None):
        spec = get_model_spec(config.model)
        seg = config.segmentation_loss or spec.segmentation_loss
        cls = config.classification_loss or spec.classification_loss
        self.segmentation = LOSSES[seg] if seg and spec.segments else None
        self.classification = LOSSES[cls] if cls and spec.classifies else None
        if self.classification is not None and config.class_weight_power and class_counts:
            weights = class_weights(class_counts, config.class_weight_power)
            keyword = {"cross_entropy": "weight", "focal": "alpha"}.get(cls)
            if keyword is None:
                raise ValueError(f"classification loss {cls!r} takes no class weights")
            self.classification = partial(self.classification, **{keyword: weights})
        self.classification_weight = config.classification_weight

    def __call__(self, outputs, masks, labels) -> torch.Tensor:
        loss = torch.zeros((), device=labels.device)
        if self.segmentation is not None:
            loss = loss + self.segmentation(outputs[MASK_LOGITS], masks.float())
        if self.classification is not None:
            loss = loss + self.classification_weight * self.classification(
                outputs[CLASS_LOGITS], labels
            )
        return loss


def _batches(shard, batch_size: int, drop_last: bool = False):
    # Training drops a last short batch: BatchNorm cannot train on a batch of one (DeepLabv3+'s
    # image-pooling branch sees one value per channel per image).
    for batch in shard.iter_batches(
        batch_size=batch_size, batch_format="numpy", drop_last=drop_last
    ):
        ok = batch["ok"]
        yield (
            torch.from_numpy(np.ascontiguousarray(batch["image"][ok])).permute(0, 3, 1, 2),
            torch.from_numpy(np.ascontiguousarray(batch["mask"][ok])),
            torch.from_numpy(batch["label"][ok]),
            int((~ok).sum()),
        )


def _all_reduce_sum(values: list[float], device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


@torch.no_grad()
def validate(
    stage: StagePredictor, batches, objective, evaluator: Evaluator | None = None
) -> dict[str, float]:
    """The whole validation set on this worker (rank 0) through the stage's ``Predictor``: loss and
    the metrics of ``Evaluator``.

    Runs the unwrapped module: a DDP forward may broadcast buffers, a collective the other ranks,
    not validating, would never join."""
    predictor = stage.predictor
    predictor.model.eval()
    evaluator = evaluator or Evaluator(predictor.class_names)
    loss_sum, skipped = 0.0, 0
    for images, masks, labels, bad in batches:
        skipped += bad
        if len(images) == 0:
            continue
        outputs, prediction = predictor.run(images)
        masks, labels = masks.to(predictor.device), labels.to(predictor.device)
        loss_sum += objective(outputs, masks, labels).item() * len(images)
        evaluator.update(prediction, masks, labels)
    scores = evaluator.result()
    results = {f"val_{k}": v for k, v in scores.items()}
    results["val_loss"] = loss_sum / max(evaluator.images, 1)
    results["val_skipped"] = skipped
    return results


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _autocast(config: TrainConfig, device: torch.device):
    return torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"
    )


def train_func(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    config = TrainConfig.model_validate(loop_config["config"])
    num_classes = len(loop_config["class_names"])
    train_count = int(loop_config["train_count"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.seed + rank)
    if config.scaling.torch_threads:
        torch.set_num_threads(config.scaling.torch_threads)

    model = build_model(config, num_classes)
    if config.init_from:
        initialise_from(model, config.init_from)
    state = TrainingState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.resume:
        checkpoint = ray.train.Checkpoint.from_directory(config.resume)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = read_checkpoint(directory, model)
        # A run restored at epoch k (a lost worker, --resume) would otherwise draw the first
        # epochs' augmentations again.
        torch.manual_seed(config.seed + rank + 1_000_003 * state.epoch)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()

    # What each shard delivers, so that the schedule ends where the run does (with ceil(N / world /
    # batch) it assumed a step more an epoch than a worker takes, and more, the more workers).
    steps_per_epoch = max(1, batches_per_shard(train_count, world, config.batch_size))
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    optimizer = build_optimizer(config.optim, model.parameters())
    schedule = lr_schedule(config.optim, steps_per_epoch * config.epochs, steps_per_epoch)
    if state.optimizer is None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    else:
        optimizer.load_state_dict(state.optimizer)
        # The schedule is a function of the step: rebuilt at the restored epoch's first step, it
        # sets the learning rate for this run's length (a resumed run may ask for more epochs) and
        # its steps per epoch (it may run on another number of workers, whose steps the restored
        # global step counted).
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, schedule, last_epoch=state.epoch * steps_per_epoch - 1
        )
    step = _Step(
        model=model,
        stage=StagePredictor(config, _unwrap(model), loop_config["class_names"], device),
        objective=_Objective(config, loop_config.get("class_counts")),
        transform=augmentation(config.data.augment, config.data.image_size),
        optimizer=optimizer,
        scheduler=scheduler,
        config=config,
        device=device,
    )
    history, global_step = list(state.history), state.global_step
    train_shard = ray.train.get_dataset_shard("train")
    validation_shard = ray.train.get_dataset_shard("validation")

    for epoch in range(state.epoch, config.epochs):
        _kill_if_asked(loop_config.get("fault_injection"), epoch, rank)
        model.train()
        started, lr_at_start = time.perf_counter(), optimizer.param_groups[0]["lr"]
        batches = _batches(train_shard, config.batch_size, drop_last=True)
        loss_sum, seen, skipped, steps = step.epoch(batches, steps_per_epoch)
        global_step += steps
        for _ in range(steps, steps_per_epoch):  # batches skipped (no readable image): the
            scheduler.step()  # schedule stays at the epoch's end, where a restored run starts
        elapsed = time.perf_counter() - started
        loss_sum, seen, skipped = _all_reduce_sum([loss_sum, seen, skipped], device)
        results: dict[str, float] = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_images": seen,
            "train_skipped": skipped,
            "images_per_s": seen / max(elapsed, 1e-9),
            "torch_threads": torch.get_num_threads(),
            "lr": lr_at_start,
            "global_step": global_step,
        }
        stop = 0.0
        if rank == 0:
            validation = _batches(validation_shard, config.batch_size)
            results.update(validate(step.stage, validation, step.objective))
            history.append(results)
            stop = float(should_stop_early(history, config))
            # Straight to stdout: Ray Train's print patch would also log it, showing each line twice.
            sys.stdout.write(_progress_line(results, config.epochs, bool(stop)) + "\n")
            sys.stdout.flush()
        with tempfile.TemporaryDirectory() as directory:
            if rank == 0:
                write_checkpoint(
                    directory, _unwrap(model), optimizer, scheduler, epoch + 1, global_step, history
                )
                ray.train.report(results, checkpoint=ray.train.Checkpoint.from_directory(directory))
            else:
                ray.train.report(results)
        if _all_reduce_sum([stop], device)[0]:  # every rank stops at the same epoch
            break


def should_stop_early(history: list[dict[str, float]], config: TrainConfig) -> bool:
    """True when ``checkpoint.metric`` has not improved on its best for ``early_stopping_patience``
    epochs (the epochs since the best one, over the whole history, a resumed run's included)."""
    patience, metric = config.early_stopping_patience, config.checkpoint.metric
    scores = [row[metric] for row in history if metric in row]
    if not patience or not scores:
        return False
    sign = 1 if config.checkpoint.mode == "max" else -1
    best = max(range(len(scores)), key=lambda i: (sign * scores[i], -i))
    return len(scores) - 1 - best >= patience


@dataclass
class _Step:
    """One worker's optimiser steps over its shard of an epoch."""

    model: torch.nn.Module
    stage: StagePredictor
    objective: _Objective
    transform: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    config: TrainConfig
    device: torch.device

    def epoch(self, batches, steps_per_epoch: int) -> tuple[float, int, int, int]:
        """(loss sum, images, unreadable images, steps). Every rank takes a step on the same
        batches: a batch with no readable image on any rank is skipped by all of them, since a
        rank that skipped alone would leave the others waiting in DDP's gradient all-reduce."""
        loss_sum, seen, skipped, steps = 0.0, 0, 0, 0
        for images, masks, labels, bad in batches:
            skipped += bad
            if steps >= steps_per_epoch:
                continue  # drain the shard so every worker finishes the epoch together
            if not _every_rank_has_images(len(images), self.device):
                continue
            loss_sum += self.step(images, masks, labels) * len(images)
            seen += len(images)
            steps += 1
        return loss_sum, seen, skipped, steps

    def step(self, images, masks, labels) -> float:
        config, device = self.config, self.device
        images, masks = augment_batch(self.transform, images, masks)
        masks, labels = masks.to(device), labels.to(device)
        x = self.stage.train_input(images.to(device), masks)
        with _autocast(config, device):
            outputs = self.model(x)
        loss = self.objective({k: v.float() for k, v in outputs.items()}, masks, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.optim.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.optim.grad_clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        return loss.item()


def _every_rank_has_images(count: int, device) -> bool:
    flag = torch.tensor([1 if count > 0 else 0], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _progress_line(results: dict[str, float], epochs: int, stopping: bool = False) -> str:
    parts = [
        f"epoch {int(results['epoch'])}/{epochs}",
        f"loss {results['train_loss']:.4f}",
        f"{results['images_per_s']:.1f} img/s",
        f"lr {results['lr']:.2e}",
        f"val_loss {results['val_loss']:.4f}",
    ]
    for key in HEADLINE_METRICS:
        if key in results:
            parts.append(f"{key.removeprefix('val_')} {results[key]:.4f}")
    if results.get("train_skipped") or results.get("val_skipped"):
        parts.append(f"skipped {int(results['train_skipped'])}+{int(results['val_skipped'])}")
    if stopping:
        parts.append("early stop")
    return "  ".join(parts)
