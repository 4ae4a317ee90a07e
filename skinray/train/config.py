"""The training job's typed configuration, validated at the door.

A config is YAML (a recipe shipped in ``skinray/train/recipes/`` or a user file) plus ``key=value``
overrides with dotted keys (``optim.lr=1e-3``). Every mistake — an unknown key, a value of the wrong
type, a model that is not registered, an unknown loss or dataset — is one ``ConfigError`` naming the key
and what is allowed, raised before anything starts on the cluster.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from skinray.data.datasets import HAM10000_CLASSES, ISIC2017_CLASSES

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "OptimConfig",
    "ScalingSettings",
    "TrainConfig",
    "apply_overrides",
    "changed_settings",
    "flat_settings",
    "list_recipes",
    "load_config",
    "recipe_summary",
    "smoke_test_config",
]


class ConfigError(ValueError):
    """A training configuration that cannot be used, with the key at fault and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    """Where the images come from and how they are split."""

    source: Literal["isic2017", "ham10000", "manifest", "synthetic"] = "synthetic"
    #: Dataset root (local path or s3://); for ``manifest`` the CSV/Parquet file.
    root: str | None = None
    #: Validation data: a held-out fraction of the training data (by lesion where lesions are
    #: known), or the dataset's own validation split (ISIC 2017) / a second manifest.
    validation: Literal["holdout", "split"] = "holdout"
    validation_fraction: float = Field(0.15, gt=0, lt=1)
    #: The hold-out's own seed, apart from ``seed``: runs of other seeds are measured on the same
    #: validation images, so their spread is the training's, not the split's.
    validation_seed: int = 0
    validation_manifest: str | None = None
    image_size: tuple[int, int] = (224, 224)
    class_names: tuple[str, ...] | None = None
    #: Use at most this many training images, drawn at random with ``seed`` (None: all); for
    #: quick runs.
    limit: int | None = Field(None, gt=0)
    synthetic_count: int = Field(64, gt=1)
    augment: Literal["none", "flips", "two_step", "mbdcnn", "asnet", "clnet", "dermoscopy"] = (
        "flips"
    )
    #: A new order of the training rows every epoch (the same orders for the same ``seed``).
    shuffle: bool = True
    #: What the model sees: the whole image, or the lesion ROI (the two-step classifier, Innani et
    #: al. Sec. 3.2) cut by ``skinray.models.two_step`` from the ``image_size`` image with the
    #: ``roi_segmenter``'s predicted mask, as evaluation and scoring cut it.
    input: Literal["image", "roi"] = "image"
    #: For ``input: roi`` (required): the saved segmenter whose predicted masks make the ROIs.
    roi_segmenter: str | None = None
    #: For ``input: roi``: the classifier's input size (default ``image_size``) and the ROI box's
    #: margin, a fraction of the lesion box.
    roi_size: tuple[int, int] | None = None
    roi_margin: float = Field(0.1, ge=0, le=1)
    #: For ``input: roi``, where the training ROIs' masks come from: ``live``, the segmenter run on
    #: every augmented batch (as validation runs it); ``cached``, its mask of each un-augmented
    #: training image, predicted once before training (stored under the output, keyed by the
    #: segmenter's SHA-256 and ``image_size``) and augmented with the image, as the paper cuts its
    #: ROIs offline (Innani et al. Sec. 3.2). Validation always runs the segmenter.
    roi_masks: Literal["live", "cached"] = "live"
    #: Saved models run in order on each batch whose last output becomes the extra input channels
    #: (MB-DCNN: [coarse-SN] for mask-CN, [coarse-SN, mask-CN] for enhanced-SN). A model that
    #: takes guidance channels needs them: ground-truth masks never stand in.
    guidance_models: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _root_needed(self) -> DataConfig:
        if self.source != "synthetic" and not self.root:
            raise ValueError(f"data.root is required for data.source={self.source!r}")
        if (
            self.validation == "split"
            and self.source == "manifest"
            and not self.validation_manifest
        ):
            raise ValueError("data.validation=split with a manifest needs data.validation_manifest")
        fixed = {"isic2017": ISIC2017_CLASSES, "ham10000": HAM10000_CLASSES}.get(self.source)
        if fixed and self.class_names and tuple(self.class_names) != tuple(fixed):
            # The reader labels by its own list: other names would be saved against its labels.
            raise ValueError(
                f"data.class_names: {self.source}'s labels are {list(fixed)}, in this order"
            )
        return self


class OptimConfig(_Strict):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-4, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    #: Per iteration: ``poly`` lr · (1 - step/total)^power (ASNet, CLNet); ``cosine`` half a cosine
    #: from lr to 0 (Loshchilov & Hutter, SGDR); ``constant`` otherwise.
    schedule: Literal["poly", "cosine", "constant"] = "constant"
    poly_power: float = Field(0.9, gt=0)
    #: Linear warm-up from 0 over this many epochs before the schedule (any schedule).
    warmup_epochs: float = Field(0.0, ge=0)
    #: Clip the gradients' global L2 norm to this (None: no clipping; none of the papers clips).
    grad_clip_norm: float | None = Field(None, gt=0)


class ScalingSettings(_Strict):
    #: Data-parallel workers (DDP). Each takes ``batch_size`` images a step, so the global batch is
    #: ``batch_size`` × workers and an epoch has that many times fewer steps; the learning rate is
    #: not scaled, and BatchNorm's statistics are each worker's own batch's (no SyncBatchNorm). A
    #: paper's recipe (its batch) is reproduced on one worker.
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(1, gt=0)

    @model_validator(mode="after")
    def _whole_gpus_for_several_workers(self) -> ScalingSettings:
        # Ray would pack fractional workers onto one GPU, where NCCL refuses a duplicate GPU.
        if self.use_gpu and self.num_workers > 1 and not float(self.gpus_per_worker).is_integer():
            raise ValueError(
                f"gpus_per_worker {self.gpus_per_worker:g} with {self.num_workers} workers: "
                "DDP needs whole GPUs a worker (NCCL refuses two workers on one GPU)"
            )
        return self

    #: Intra-op threads of each worker's PyTorch (None: Ray's, which is ``cpus_per_worker``). On a
    #: small CPU node the worker holds one CPU so that Ray Data's read and augment tasks get the
    #: rest, yet its forward and backward passes may use every core between their batches.
    torch_threads: int | None = Field(None, ge=1)


class CheckpointConfig(_Strict):
    #: Validation metric that picks the best checkpoint (``val_`` + a metrics name, or ``val_loss``).
    metric: str = "val_jaccard"
    mode: Literal["max", "min"] = "max"
    num_to_keep: int = Field(2, ge=1)


class TrainConfig(_Strict):
    model: str
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    #: ImageNet weights for the encoder (local or s3:// safetensors); None: random initialisation.
    encoder_weights: str | None = None
    #: Loss names from ``skinray.losses.LOSSES``; None takes the paper's loss from the registry.
    segmentation_loss: str | None = None
    classification_loss: str | None = None
    #: Class weights of the classification loss from the training labels' counts (``class_weights``):
    #: 1 = inverse frequency, 0.5 = its square root, 0 = unweighted (the papers).
    class_weight_power: float = Field(0.0, ge=0, le=1)
    #: Weight of the classification loss for models with both heads.
    classification_weight: float = Field(1.0, ge=0)
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    scaling: ScalingSettings = ScalingSettings()
    checkpoint: CheckpointConfig = CheckpointConfig()
    epochs: int = Field(10, ge=1)
    #: Images a step on each worker (``scaling.num_workers``).
    batch_size: int = Field(16, ge=1)
    #: ``bf16``: bf16 autocast of the training passes, on GPU and CPU alike (fast on CPUs with bf16
    #: arithmetic, AVX512_BF16 or AMX; emulated, slow, elsewhere); validation runs as the Predictor
    #: does. ``fp32``: full precision, as the papers.
    precision: Literal["fp32", "bf16"] = "fp32"
    #: Stop when ``checkpoint.metric`` has not improved for this many epochs (None: never); the
    #: best checkpoint is kept either way.
    early_stopping_patience: int | None = Field(None, ge=1)
    seed: int = 0
    #: Where the final model, metrics.json and the training curve go (local or s3://).
    output: str = "runs/latest"
    #: Ray Train's run storage (checkpoints); default: ``<output>/ray``.
    storage_path: str | None = None
    max_failures: int = Field(2, ge=0)
    #: A checkpoint directory to resume from (model, optimiser, scheduler and epoch).
    resume: str | None = None
    #: A saved model whose weights start this one where names and shapes match (enhanced-SN starts
    #: from coarse-SN); every weight it holds must find its place.
    init_from: str | None = None
    #: Cap on training batches per epoch (None: the whole shard); for smoke runs.
    max_steps_per_epoch: int | None = Field(None, gt=0)

    @field_validator("model")
    @classmethod
    def _registered(cls, name: str) -> str:
        from skinray.models import list_models

        known = list_models()
        if name not in known:
            raise ValueError(f"unknown model {name!r}; known models: {', '.join(known)}")
        return name

    @field_validator("segmentation_loss", "classification_loss")
    @classmethod
    def _known_loss(cls, name: str | None) -> str | None:
        from skinray.losses import LOSSES

        if name is not None and name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}")
        return name

    @model_validator(mode="after")
    def _model_kwargs_accepted(self) -> TrainConfig:
        from skinray.models import get_model_spec

        accepted = get_model_spec(self.model).accepted_kwargs()
        unknown = sorted(set(self.model_kwargs) - set(accepted))
        if unknown:
            raise ValueError(
                f"model_kwargs {unknown} not taken by {self.model!r}; it takes: "
                + ", ".join(k for k in accepted if k != "encoder_weights")
            )
        if "encoder_weights" in self.model_kwargs:
            raise ValueError("set encoder_weights at the top level, not in model_kwargs")
        return self

    @model_validator(mode="after")
    def _checkpoint_metric_reported(self) -> TrainConfig:
        # A metric the model does not report scores every epoch alike (-inf, or the frozen
        # segmenter's Jaccard under an ROI classifier): the "best" checkpoint is then whichever
        # Ray kept first, and early stopping stops after exactly its patience.
        from skinray.models import get_model_spec

        spec, metric = get_model_spec(self.model), self.checkpoint.metric
        figure = metric.removeprefix("val_")
        wrong = (figure in _MASK_FIGURES and not spec.segments) or (
            figure in _CLASS_FIGURES and not spec.classifies
        )
        if wrong:
            raise ValueError(
                f"checkpoint.metric {metric!r}: {self.model} does not report it (it has no "
                f"{'mask' if figure in _MASK_FIGURES else 'class'} output); pick one it reports, "
                + ("val_balanced_accuracy or val_auc_mean" if spec.classifies else "val_jaccard")
                + ", or val_loss"
            )
        return self


# Validation figures only a model with that output reports ("accuracy" is both: not checked).
_MASK_FIGURES = frozenset({"jaccard", "threshold_jaccard", "dice", "sensitivity", "specificity"})
_CLASS_FIGURES = frozenset({"balanced_accuracy", "auc_mean", "ece"})


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = []
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = f"unknown key; {_allowed_at(problem['loc'], key)}"
        elif problem["type"] == "literal_error":
            message = f"{message} (got {problem['input']!r})"
        lines.append(f"{key}: {message}")
    return f"{source}: invalid training config\n  " + "\n  ".join(lines)


def _allowed_at(loc: tuple, key: str) -> str:
    model: type[BaseModel] = TrainConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            break
        if issubclass(field.annotation, BaseModel):
            model = field.annotation
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"allowed keys here: {', '.join(allowed)}{hint}"


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested dict, returning a copy."""
    result = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} is not key=value (e.g. optim.lr=0.001)")
        node = result
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node[leaf] = _parse_scalar(value)
    return result


#: Settings that say where things are, how a run is kept or on how many threads it runs, not what
#: it learns: left out of the summary. Every other setting that differs from its default is in it.
_NOT_RESULT_SETTINGS = frozenset(
    {
        "output",
        "storage_path",
        "max_failures",
        "resume",
        "checkpoint.num_to_keep",
        "data.root",
        "data.validation_manifest",
        "scaling.cpus_per_worker",
        "scaling.gpus_per_worker",
        "scaling.torch_threads",
    }
)


def flat_settings(settings: dict | None, prefix: str = "") -> dict[str, Any]:
    """A config's ``model_dump`` as ``{"data.image_size": ..., ...}`` (``model_kwargs`` whole)."""
    flat = {}
    for key, value in (settings or {}).items():
        if isinstance(value, dict) and value and key != "model_kwargs":
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(base: dict | None, settings: dict) -> list[str]:
    """The flat keys (``flat_settings``) whose value in ``settings`` differs from ``base``'s, in
    ``settings``' order, then the keys only ``base`` has."""
    before, after = flat_settings(base), flat_settings(settings)
    keys = [*after, *(key for key in before if key not in after)]
    return [key for key in keys if before.get(key) != after.get(key)]


def _other_settings(config: TrainConfig, shown: set[str]) -> str:
    """``key=value`` for every setting that changes a result, is not ``shown`` and differs from
    its default: the summary's headline fields cannot name every setting a recipe may change."""
    defaults = TrainConfig.model_construct(model=config.model).model_dump(mode="json")
    settings = config.model_dump(mode="json")
    flat = flat_settings(settings)
    other = [
        f"{key}={_short(flat.get(key))}"
        for key in changed_settings(defaults, settings)
        if key not in shown and key not in _NOT_RESULT_SETTINGS
    ]
    return f"; {', '.join(other)}" if other else ""


def _short(value: Any) -> str:
    if isinstance(value, str) and ("/" in value or "\\" in value):
        parts = value.replace("\\", "/").rstrip("/").split("/")
        # A file by its name; a saved model (<stage>/model) by its folder too.
        return "/".join(parts[-2:]) if parts[-1] == "model" else parts[-1]
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


#: What the headline of ``recipe_summary`` shows, in its own words.
_SHOWN = {
    "model",
    "data.source",
    "data.image_size",
    "data.input",
    "data.roi_size",
    "data.roi_margin",
    "data.roi_masks",
    "data.augment",
    "data.shuffle",
    "optim.name",
    "optim.lr",
    "optim.schedule",
    "optim.poly_power",
    "optim.warmup_epochs",
    "optim.weight_decay",
    "optim.grad_clip_norm",
    "precision",
    "class_weight_power",
    "batch_size",
    "epochs",
    "early_stopping_patience",
    "seed",
    "data.validation",
    "data.validation_fraction",
    "data.validation_seed",
}


def recipe_summary(config: TrainConfig) -> str:
    """One line of every setting that changes a recipe's result: the headline ones, then any
    other that differs from its default (``key=value``; a path by its file name)."""
    optim = config.optim
    schedule = optim.schedule + (f" {optim.poly_power}" if optim.schedule == "poly" else "")
    if optim.warmup_epochs:
        schedule += f" warmup {optim.warmup_epochs:g} ep"
    stopping = (
        f"early stop {config.early_stopping_patience} ep on {config.checkpoint.metric}"
        if config.early_stopping_patience
        else "no early stop"
    )
    weighting = (
        f"class weights (N/C·n)^{config.class_weight_power:g}; "
        if config.class_weight_power
        else ""
    )
    data = config.data
    validation = (
        "validated on the source's validation split"
        if data.validation == "split"
        else f"validated on a {data.validation_fraction:g} hold-out (hold-out seed {data.validation_seed})"
    )
    roi = ""
    if data.input == "roi":
        size = data.roi_size or data.image_size
        roi = f", ROI {size[0]}×{size[1]} margin {data.roi_margin:g}, {data.roi_masks} masks"
    return (
        f"{config.model}, {data.source} {data.image_size[0]}×{data.image_size[1]}{roi}, "
        f"augment {data.augment}, "
        f"shuffle {'on' if config.data.shuffle else 'off'}; {optim.name} lr {optim.lr:g} {schedule}, "
        f"wd {optim.weight_decay:g}, clip {optim.grad_clip_norm or 'none'}, {config.precision}; "
        f"{weighting}batch {config.batch_size}, {config.epochs} ep, {stopping}; seed {config.seed}, "
        f"{validation}"
        f"{_other_settings(config, _SHOWN)}"
    )


def list_recipes() -> list[str]:
    """Names of the recipes shipped with skinray (one per paper)."""
    folder = resources.files("skinray.train") / "recipes"
    return sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )


def _read_yaml(path_or_recipe: str) -> tuple[dict[str, Any], str]:
    path = Path(path_or_recipe)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        text, source = path.read_text(), str(path)
    else:
        if path_or_recipe not in list_recipes():
            raise ConfigError(
                f"unknown recipe {path_or_recipe!r}; recipes: {', '.join(list_recipes())} "
                "(or give a path to a .yaml file)"
            )
        text = (resources.files("skinray.train") / "recipes" / f"{path_or_recipe}.yaml").read_text()
        source = f"recipe {path_or_recipe}"
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML ({error})") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys")
    return raw, source


def validate(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None


def load_config(recipe_or_path: str, overrides: list[str] | None = None) -> TrainConfig:
    """A recipe name (``unet_two_step``) or YAML path, with ``key=value`` overrides applied."""
    raw, source = _read_yaml(recipe_or_path)
    return validate(apply_overrides(raw, overrides or []), source)


def smoke_test_config(
    model: str = "unet", output: str | None = None, overrides: list[str] | None = None
) -> TrainConfig:
    """The same code path on synthetic data, a small model and 2 short epochs: < 1 minute on a CPU.
    ``output`` defaults to ``runs/smoke-<model>``: one model's run folder is no other's to continue."""
    from skinray.models import get_model_spec

    spec = get_model_spec(model)
    raw = {
        "model": model,
        "model_kwargs": dict(spec.smoke_kwargs),
        "data": {"source": "synthetic", "synthetic_count": 48, "image_size": [64, 64]},
        "optim": {"name": "adam", "lr": 1e-3},
        "epochs": 2,
        "batch_size": 8,
        "output": output or f"runs/smoke-{model}",
        "checkpoint": {
            "metric": "val_jaccard" if spec.segments else "val_balanced_accuracy",
        },
    }
    return validate(apply_overrides(raw, overrides or []), "smoke test")
