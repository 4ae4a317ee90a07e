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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors

from skinray import io
from skinray.data.transforms import augment_batch, augmentation
from skinray.evaluation import Evaluator, model_input
from skinray.losses import LOSSES
from skinray.models import CLASS_LOGITS, MASK_LOGITS, create_model, get_model_spec
from skinray.models.serialization import WEIGHTS_FILE
from skinray.train.checkpoint import TrainingState, read_checkpoint, write_checkpoint
from skinray.train.config import OptimConfig, TrainConfig
from skinray.train.guidance import GuidanceChain, RoiSegmenter

__all__ = [
    "build_model",
    "build_optimizer",
    "fault_injection_from_environment",
    "poly_schedule",
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


def poly_schedule(optim: OptimConfig, total_steps: int):
    """lr · (1 - step/total)^power per iteration (ASNet Sec. 2.5, CLNet Sec. 3.1), or constant."""
    if optim.schedule == "constant":
        return lambda step: 1.0
    return lambda step: max(0.0, 1 - step / max(1, total_steps)) ** optim.poly_power


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


class ModelInputs:
    """Decoded batches → model input, with a guidance chain's channels or a ROI segmenter's masks
    where the config names them (MB-DCNN's later stages, the two-step classifier)."""

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        self.roi = config.data.input == "roi"
        models = config.data.guidance_models
        self.chain = GuidanceChain(models, device) if models else None
        segmenter = config.data.roi_segmenter
        self.segmenter = RoiSegmenter(segmenter, device) if segmenter and self.roi else None

    def __call__(self, images, masks, model, mean, std, device) -> torch.Tensor:
        images = images.to(device)
        guidance = self.chain(images) if self.chain else None
        roi_masks = self.segmenter(images) if self.segmenter else None
        return model_input(
            images, masks, model.input_channels, mean, std, device, self.roi, guidance, roi_masks
        )


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
    def __init__(self, config: TrainConfig):
        spec = get_model_spec(config.model)
        seg = config.segmentation_loss or spec.segmentation_loss
        cls = config.classification_loss or spec.classification_loss
        self.segmentation = LOSSES[seg] if seg and spec.segments else None
        self.classification = LOSSES[cls] if cls and spec.classifies else None
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
    model, shard, objective, config, class_names, device, mean, std, inputs
) -> dict[str, float]:
    """The whole validation set on this worker (rank 0): loss and the metrics of ``Evaluator``.

    Runs the unwrapped module: a DDP forward may broadcast buffers, a collective the other ranks,
    not validating, would never join."""
    model = _unwrap(model)
    model.eval()
    evaluator = Evaluator(class_names)
    loss_sum, skipped = 0.0, 0
    for images, masks, labels, bad in _batches(shard, config.batch_size):
        skipped += bad
        if len(images) == 0:
            continue
        x = inputs(images, masks, model, mean, std, device)
        with _autocast(config, device):
            outputs = {k: v.float() for k, v in model(x).items()}
        masks, labels = masks.to(device), labels.to(device)
        loss_sum += objective(outputs, masks, labels).item() * len(images)
        evaluator.update(outputs, masks, labels)
    scores = evaluator.result()
    results = {f"val_{k}": v for k, v in scores.items()}
    results["val_loss"] = loss_sum / max(evaluator.images, 1)
    results["val_skipped"] = skipped
    return results


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _autocast(config: TrainConfig, device: torch.device):
    enabled = config.amp and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def train_func(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    config = TrainConfig.model_validate(loop_config["config"])
    num_classes = len(loop_config["class_names"])
    train_count = int(loop_config["train_count"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.seed + rank)

    model = build_model(config, num_classes)
    if config.init_from:
        initialise_from(model, config.init_from)
    mean, std = model.normalization
    state = TrainingState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.resume:
        checkpoint = ray.train.Checkpoint.from_directory(config.resume)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = read_checkpoint(directory, model)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()

    steps_per_epoch = math.ceil(train_count / world / config.batch_size)
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    optimizer = build_optimizer(config.optim, model.parameters())
    schedule = poly_schedule(config.optim, steps_per_epoch * config.epochs)
    if state.optimizer is None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    else:
        optimizer.load_state_dict(state.optimizer)
        # The schedule is a function of the global step: rebuilt at the restored step, it sets the
        # learning rate for this run's length (a resumed run may ask for more epochs).
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, schedule, last_epoch=state.global_step - 1
        )
    objective = _Objective(config)
    inputs = ModelInputs(config, device)
    transform = augmentation(config.data.augment, config.data.image_size)
    history, global_step = list(state.history), state.global_step
    train_shard = ray.train.get_dataset_shard("train")
    validation_shard = ray.train.get_dataset_shard("validation")

    for epoch in range(state.epoch, config.epochs):
        _kill_if_asked(loop_config.get("fault_injection"), epoch, rank)
        model.train()
        started, loss_sum, seen, skipped, steps = time.perf_counter(), 0.0, 0, 0, 0
        lr_at_start = optimizer.param_groups[0]["lr"]
        for images, masks, labels, bad in _batches(train_shard, config.batch_size, drop_last=True):
            skipped += bad
            if steps >= steps_per_epoch or len(images) == 0:
                continue  # drain the shard so every worker finishes the epoch together
            images, masks = augment_batch(transform, images, masks)
            x = inputs(images, masks, _unwrap(model), mean, std, device)
            masks, labels = masks.to(device), labels.to(device)
            with _autocast(config, device):
                outputs = model(x)
            loss = objective({k: v.float() for k, v in outputs.items()}, masks, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.optim.grad_clip_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip_norm)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(images)
            seen += len(images)
            steps += 1
            global_step += 1
        elapsed = time.perf_counter() - started
        loss_sum, seen, skipped = _all_reduce_sum([loss_sum, seen, skipped], device)
        results: dict[str, float] = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_images": seen,
            "train_skipped": skipped,
            "images_per_s": seen / max(elapsed, 1e-9),
            "lr": lr_at_start,
            "global_step": global_step,
        }
        if rank == 0:
            results.update(
                validate(
                    model,
                    validation_shard,
                    objective,
                    config,
                    loop_config["class_names"],
                    device,
                    mean,
                    std,
                    inputs,
                )
            )
            history.append(results)
            # Straight to stdout: Ray Train's print patch would also log it, showing each line twice.
            sys.stdout.write(_progress_line(results, config.epochs) + "\n")
            sys.stdout.flush()
        with tempfile.TemporaryDirectory() as directory:
            if rank == 0:
                write_checkpoint(
                    directory, _unwrap(model), optimizer, scheduler, epoch + 1, global_step, history
                )
                ray.train.report(results, checkpoint=ray.train.Checkpoint.from_directory(directory))
            else:
                ray.train.report(results)


def _progress_line(results: dict[str, float], epochs: int) -> str:
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
    return "  ".join(parts)
