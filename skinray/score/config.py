"""The scoring job's typed configuration, validated before anything runs."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from skinray import io
from skinray.data.decode import DEFAULT_MAX_PIXELS

__all__ = ["ScoreConfig", "ScoreConfigError", "make_score_config"]

#: ``skinray.backends.BACKENDS``, named here without importing torch.
BACKEND_NAMES = (
    "eager",
    "eager-bf16",
    "eager-mixed",
    "compile",
    "openvino",
    "openvino-bf16",
    "openvino-mixed",
    "openvino-int8",
)


class ScoreConfigError(ValueError):
    """A scoring configuration that cannot be used; the message names the key."""


class ScoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: ``s3://bucket/prefix/``, a local folder, or a manifest (.csv/.txt/.parquet listing URIs).
    input: str
    #: Output root (local or s3://): ``results/``, ``errors/`` and ``summaries/`` go under it.
    output: str
    #: Saved segmenter (``save_model`` directory, or a released model's name); a joint model
    #: (MB-DCNN, CLNet) also classifies. Not given: the released ``lesion-segmenter`` with the
    #: released ``ham10000-classifier`` (``skinray.models.zoo``).
    segmenter: str
    #: Saved ROI classifier; None when the segmenter classifies.
    classifier: str | None = None
    run_date: dt.date = Field(default_factory=lambda: dt.datetime.now(dt.UTC).date())
    #: Names the run's staging folder, its files and its rows: letters, digits, ``.``, ``_`` and
    #: ``-``, not starting with ``.`` (``..`` made the staging folder the output root itself,
    #: which the commit then deleted).
    run_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    incremental: bool = False
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0)
    include_cam: bool = False
    #: How the model actors run the networks (``skinray.backends``): eager, compile, openvino,
    #: openvino-bf16, openvino-mixed (bf16 segmenter, f32 classifier) or openvino-int8 (int8
    #: segmenter, f32 classifier). None: the fastest that passed the accuracy guard on the actor's
    #: device: on CPU openvino-int8 where ``int8_calibration`` names images, else openvino-mixed.
    backend: Literal[BACKEND_NAMES] | None = None
    #: Real images (folder, ``s3://`` prefix or manifest) that calibrate ``openvino-int8``: up to
    #: ``skinray.backends.INT8_CALIBRATION_IMAGES`` of them, spread over the sorted listing. The
    #: quantised networks are cached per node by their weights and these images.
    int8_calibration: str | None = None
    #: Rows per model call on an actor.
    batch_size: int = Field(16, ge=1)
    #: Rows a decode task yields at a time (one Ray Data block), and rows per descriptor and row
    #: task. Every block costs Ray Data a scheduling round, a (de)serialisation and a task in each
    #: later stage: on 440 archive images (2 CPUs, openvino-mixed) a run took 19.0–20.4 s at 8,
    #: 13.8–17.3 s at 16, 13.9–14.5 s at 32 and 12.2–13.3 s at 64.
    decode_batch_size: int = Field(64, ge=1)
    #: Actor pool size bounds per model stage; the upper bound defaults to the GPUs the cluster
    #: may grow to (or 1 actor per 4 of its CPUs where it has no GPUs): its autoscaler's node types
    #: at their maximum counts, or what is up where nothing autoscales.
    min_actors: int = Field(1, ge=1)
    max_actors: int | None = Field(None, ge=1)
    #: One GPU per model actor. None: when the cluster has GPUs or GPU node types its autoscaler
    #: may start (the pending actors' requests bring them up). True where Ray reports no
    #: autoscaler config (some managed clusters) and GPU nodes start from zero.
    use_gpu: bool | None = None
    #: Decode JPEGs in the segmenter actor, on its device (nvJPEG on a GPU), instead of in the
    #: CPU read tasks, which then only screen the header. For GPU nodes whose CPUs cannot decode
    #: full-resolution JPEGs as fast as the GPU segments; other formats still decode on CPU.
    jpeg_decode_in_segmenter: bool = False
    #: torch threads of a model actor on a CPU-only node. None: the node's CPUs over the actors a
    #: stage may place there, so each stage's pool can use every core (the OS shares them with
    #: the decode tasks, which cost a fraction of the models on CPU).
    cpu_threads_per_actor: int | None = Field(None, ge=1)
    #: Object-store bytes the run's Ray Data execution may hold (decoded images queued between
    #: stages). None: ``prefetch_batches`` model batches per model actor and decode task, so the
    #: store stays flat however large the archive.
    object_store_memory_mib: float | None = Field(None, gt=0)
    #: 8 measured as fast as no bound at all on 2 CPUs (41.3 s vs 43.0 s, 440 images), 4 slower
    #: (47.6 s): Ray Data splits the budget among the stages, and the segmenter starved.
    prefetch_batches: int = Field(8, ge=1)
    #: Rows per output Parquet file, as Ray Data's write tasks take them (tens of MB: a row is
    #: a mask PNG and ~60 numbers). They wait in the object store until a file's worth has come,
    #: so the bound counts them (``skinray.score.plan.object_store_budget``).
    rows_per_file: int = Field(10_000, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _released_models_by_default(cls, values: dict) -> dict:
        # Imported here: ``skinray.models`` imports torch, and this module is imported by the
        # staging write and listing tasks, whose workers would pay ~4 s for it.
        from skinray.models.zoo import DEFAULT_CLASSIFIER, DEFAULT_SEGMENTER, released_models

        if isinstance(values, dict) and not values.get("segmenter"):
            released = released_models()
            if DEFAULT_SEGMENTER not in released:
                raise ValueError(
                    f"no --segmenter given and no released {DEFAULT_SEGMENTER!r} in this install"
                )
            classifier = values.get("classifier")
            if classifier is None and DEFAULT_CLASSIFIER in released:
                classifier = DEFAULT_CLASSIFIER
            values = {**values, "segmenter": DEFAULT_SEGMENTER, "classifier": classifier}
        return values

    @field_validator("run_id")
    @classmethod
    def _a_folder_name(cls, run_id: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}", run_id):
            raise ValueError(
                f"{run_id!r} is not a run id: up to 128 letters, digits, '.', '_' or '-', not "
                "starting with '.' (it names the run's staging folder under the output)"
            )
        return run_id

    @model_validator(mode="after")
    def _int8_is_calibrated(self) -> ScoreConfig:
        if self.backend == "openvino-int8" and not self.int8_calibration:
            raise ValueError("backend openvino-int8 needs int8_calibration (real images)")
        return self

    @field_validator("input", "output", "segmenter", "classifier")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("input")
    @classmethod
    def _absolute_input(cls, value: str) -> str:
        # Made absolute here, on the driver: the listing runs as a Ray task, and a manifest's
        # relative entries become URIs under its folder, which rows record.
        return io.absolute(value)


def make_score_config(**values) -> ScoreConfig:
    try:
        return ScoreConfig(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg'].removeprefix('Value error, ')}"
            for e in error.errors()
        )
        raise ScoreConfigError(f"invalid scoring config: {problems}") from None
