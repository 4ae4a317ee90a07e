"""Training checkpoints: everything needed to continue a run where it stopped.

A checkpoint is a directory: ``model.safetensors`` (weights), ``training_state.pt`` (optimiser and
scheduler state, epoch, global step; read back with ``torch.load(weights_only=True)``), and
``history.json`` (per-epoch metrics so far, so a resumed run draws its whole training curve).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

__all__ = ["TrainingState", "read_checkpoint", "write_checkpoint"]

MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
HISTORY_FILE = "history.json"


@dataclass
class TrainingState:
    epoch: int = 0  # epochs completed
    global_step: int = 0
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def write_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    global_step: int,
    history: list[dict[str, float]],
) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, directory / MODEL_FILE)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "global_step": global_step,
        },
        directory / STATE_FILE,
    )
    (directory / HISTORY_FILE).write_text(json.dumps(history, indent=1))


def read_checkpoint(directory: str | Path, model: nn.Module | None = None) -> TrainingState:
    """Load the weights into ``model`` (when given) and return the rest of the training state."""
    directory = Path(directory)
    for name in (MODEL_FILE, STATE_FILE):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory} is not a skinray training checkpoint: no {name}")
    if model is not None:
        model.load_state_dict(safetensors.torch.load_file(directory / MODEL_FILE), strict=True)
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    history_path = directory / HISTORY_FILE
    history = json.loads(history_path.read_text()) if history_path.exists() else []
    return TrainingState(
        epoch=int(state["epoch"]),
        global_step=int(state["global_step"]),
        optimizer=state["optimizer"],
        scheduler=state["scheduler"],
        history=history,
    )
