"""The nightly scoring job on Ray Data: list → read/decode → predict → describe → Parquet.

Decoding runs as CPU tasks; the models run in one ``skinray.predict.Predictor`` (the segmenter, or
segmenter → ROI → classifier) on an actor pool sized from the cluster (one GPU per actor
where there are GPUs, CPU actors otherwise) that Ray restarts if an actor dies, retrying its batches.
Rows stream, and the run's object store is bounded by the pool, not the archive: decoded images wait
for the models only ``prefetch_batches`` batches per actor deep (docs/benchmarks.md). Ray Data's
write tasks write the rows once, in the fixed results and errors schemas, into the run's staging
directory; the driver then moves those files into ``results/run_date=…`` and ``errors/run_date=…``
(replacing the partition of a re-run, or adding to it with ``incremental``) without reading a row,
and removes the staging directory. A run id given again continues a run whose driver died: what it
staged is committed, and only the rest is scored.

:func:`run_scoring` runs those steps, each from its own module, and writes the run's
:class:`RunSummary` under ``summaries/``:

- :mod:`skinray.score.sources`: list the inputs in a Ray task (with ``incremental``, drop those
  already scored with the same models; on a resume, those already staged) into Parquet files
  under the staging directory, which the graph reads back: no per-image state on the driver;
- :mod:`skinray.score.plan`: read the model configs; size the actor pools by what the cluster may
  grow to, and the object-store bound by the pools;
- :mod:`skinray.score.graph`: build the Ray Data graph and run it into the staging directory;
- :mod:`skinray.score.commit`: the write tasks' sink; the commit into the partitions; the staged
  URIs of a resumed run.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from skinray import io
from skinray.score.commit import Committed, StagedRunSink, commit_run, remove_staging
from skinray.score.config import ScoreConfig, ScoreConfigError
from skinray.score.graph import build_graph, write_staging
from skinray.score.plan import (
    Placement,
    ScoringModels,
    object_store_budget,
    plan_placement,
    ray_node_environment,
    read_scoring_models,
)
from skinray.score.sources import StagedListing, check_input, list_inputs, stage_listing

__all__ = ["RunSummary", "list_inputs", "run_scoring"]


#: The stages an image passes, in order, and the Ray Data operator that runs each (None: the driver).
STAGES = (
    ("list", None),
    ("read", "read_and_decode"),
    ("decode", "read_and_decode"),
    ("predict", "PredictActor"),
    ("describe", "describe_lesions"),
    ("write", "Write"),
)


@dataclass
class StageSummary:
    """One stage of a run: images that reached it, errors it recorded, and the Ray Data operator's
    task time (summed over tasks) and span (first task start to last task end)."""

    stage: str
    images_in: int
    errors: int
    task_s: float | None = None
    span_s: float | None = None

    def line(self) -> str:
        timing = (
            f"{self.task_s:8.1f} s in tasks, {self.span_s:6.1f} s span"
            if self.task_s is not None and self.span_s is not None
            else ""
        )
        return f"  {self.stage:9}{self.images_in:>9} in {self.errors:>7} errors  {timing}".rstrip()


@dataclass
class RunSummary:
    run_id: str
    run_date: str
    inputs_listed: int
    skipped_already_scored: int
    results: int
    errors: int
    errors_by_type: dict[str, int] = field(default_factory=dict)
    errors_by_stage: dict[str, int] = field(default_factory=dict)
    wall_time_s: float = 0.0
    images_per_s: float = 0.0
    results_uri: str = ""
    errors_uri: str = ""
    stages: list[StageSummary] = field(default_factory=list)
    #: The object-store bound the run's Ray Data execution ran under; 0 when nothing was scored.
    object_store_budget_mib: float = 0.0
    #: Images a dead driver of the same run id had already staged: committed, not scored again.
    resumed_from_staging: int = 0
    #: The model pool's bound and device (``skinray.score.plan.Placement``).
    max_actors: int = 0
    actor_device: str = ""
    #: The run's settings as validated (``ScoreConfig``): the ones that change a result among them
    #: (models, backend, int8 calibration, where JPEGs are decoded, pixel limit).
    settings: dict = field(default_factory=dict)

    def lines(self) -> list[str]:
        by_type = ", ".join(f"{k} {v}" for k, v in sorted(self.errors_by_type.items())) or "none"
        return [
            f"run {self.run_id} ({self.run_date})",
            f"  listed   {self.inputs_listed} images"
            + (
                f", {self.skipped_already_scored} already scored (incremental)"
                if self.skipped_already_scored
                else ""
            ),
            *(
                [f"  resumed  {self.resumed_from_staging} staged by an earlier attempt of this run"]
                if self.resumed_from_staging
                else []
            ),
            f"  results  {self.results} → {self.results_uri}",
            f"  errors   {self.errors} ({by_type}) → {self.errors_uri}",
            f"  pool     up to {self.max_actors} model actors, {self.actor_device}"
            + (
                f"; object store bounded at {self.object_store_budget_mib:.0f} MiB"
                if self.object_store_budget_mib
                else ""
            ),
            f"  time     {self.wall_time_s:.1f} s, {self.images_per_s:.1f} images/s",
            *(stage.line() for stage in self.stages),
        ]


def run_scoring(config: ScoreConfig) -> RunSummary:
    """Score ``config.input`` into ``config.output``; every listed image ends in results or errors."""
    import ray
    import ray.data

    started = time.perf_counter()
    models = read_scoring_models(config)
    check_input(config.input)
    calibration = _int8_calibration_images(config, models)
    if not ray.is_initialized():
        _init_ray()
    placement = plan_placement(config)
    use = calibration is not None and not placement.use_gpu  # GPUs run no int8
    calibration_ref = ray.put(calibration) if use else None
    staging = io.join(config.output, "_staging", config.run_id)
    listing = _stage_listing_on_a_worker(config, staging, models, placement.use_gpu)
    operator_times, budget = {}, 0
    if listing.to_score:
        rows = build_graph(listing, config, models, placement, calibration_ref)
        budget = object_store_budget(
            config, placement, models.input_size, listing.mean_source_bytes
        )
        sink = StagedRunSink(staging, models.class_names, config.run_id, config.rows_per_file)
        operator_times = write_staging(rows, sink, budget)

    committed = commit_run(staging, config, models.class_names)
    remove_staging(staging)

    wall_time_s = time.perf_counter() - started
    summary = _summary(config, listing, placement, committed, operator_times, budget, wall_time_s)
    summaries = io.join(config.output, "summaries", f"run_date={summary.run_date}")
    summary_json = json.dumps(asdict(summary), indent=2).encode()
    io.write_bytes(io.join(summaries, f"summary-{config.run_id}.json"), summary_json)
    return summary


def _int8_calibration_images(config: ScoreConfig, models: ScoringModels):
    """int8's calibration images (N×H×W×3 uint8 at the decode size), read and decoded once for
    the run, at the door, where its CPU actors may run int8; a URI under which none can be read
    and decoded is the door's error. Each actor read them itself before: from ``s3://``, 300 GETs
    and decodes an actor, and with none readable every actor fell back on its own."""
    uri = config.int8_calibration
    if not uri:
        return None
    check_input(uri)
    if config.backend not in (None, "openvino-int8") or config.use_gpu:
        return None
    from skinray.backends import read_calibration_images

    try:
        return read_calibration_images(uri, models.input_size)
    except ValueError as error:  # none could be read and decoded: the door's one line
        raise ScoreConfigError(str(error)) from None


def _init_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS (as under `ray job submit`) or one `ray start` left
    running here, or start a local one, set up as cluster.yaml sets up its worker nodes (a running
    cluster keeps its own settings; variables the user set win)."""
    import os

    import ray

    for key, value in ray_node_environment(os.cpu_count() or 1).items():
        os.environ.setdefault(key, value)
    ray.init()


def _stage_listing_on_a_worker(
    config: ScoreConfig, staging: str, models: ScoringModels, use_gpu: bool
) -> StagedListing:
    """``stage_listing`` as a Ray task: the listing is per-image state, kept off the driver (a
    run id given again leaves out what its dead driver staged). A listing the config cannot
    give (a manifest without a URI column) is still the door's one-line error."""
    import ray

    task = ray.remote(stage_listing).options(num_cpus=1, max_retries=3)
    try:
        return ray.get(
            task.remote(config, staging, models.identity, config.decode_batch_size, use_gpu)
        )
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, ScoreConfigError):
            raise error.cause from None
        raise


def _summary(
    config: ScoreConfig,
    listing: StagedListing,
    placement: Placement,
    committed: Committed,
    operator_times: dict[str, tuple[float, float]],
    budget: int,
    wall_time_s: float,
) -> RunSummary:
    listed, skipped = listing.listed, listing.skipped_already_scored
    resumed = listing.resumed_from_staging
    return RunSummary(
        run_id=config.run_id,
        run_date=config.run_date.isoformat(),
        inputs_listed=listed,
        skipped_already_scored=skipped,
        results=committed.results,
        errors=committed.errors,
        errors_by_type=dict(sorted(committed.errors_by_type.items())),
        errors_by_stage=dict(sorted(committed.errors_by_stage.items())),
        wall_time_s=wall_time_s,
        images_per_s=(listed - skipped - resumed) / wall_time_s if wall_time_s else 0.0,
        results_uri=committed.results_uri,
        errors_uri=committed.errors_uri,
        stages=_stage_summaries(
            listed,
            skipped,
            committed.errors_by_stage,
            committed.results + committed.errors,
            operator_times,
        ),
        object_store_budget_mib=round(budget / 2**20, 1),
        resumed_from_staging=resumed,
        max_actors=placement.max_actors,
        actor_device=(
            "a GPU each"
            if placement.use_gpu
            else f"CPU, {placement.cpu_threads} torch threads each"
        ),
        settings=config.model_dump(mode="json"),
    )


def _stage_summaries(
    listed: int,
    skipped: int,
    errors_by_stage: dict[str, int],
    written: int,
    operator_times: dict[str, tuple[float, float]],
) -> list[StageSummary]:
    stages, reaching = [], listed
    for stage, operator in STAGES:
        errors = errors_by_stage.get(stage, 0)
        summary = StageSummary(stage, written if stage == "write" else reaching, errors)
        if operator and stage != "read":  # read and decode are one task, timed as decode
            match = next((t for name, t in operator_times.items() if operator in name), None)
            if match:
                summary.task_s, summary.span_s = match
        stages.append(summary)
        reaching = (reaching - skipped if stage == "list" else reaching) - errors
    return stages
