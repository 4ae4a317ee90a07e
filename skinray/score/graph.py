"""The scoring run's Ray Data graph: read/decode → predict → describe → rows → staging Parquet.

Decoding runs as CPU tasks, a ``decode_batch_size`` slice of the listing a task; the models run in
one ``Predictor`` on an actor pool placed by :func:`skinray.score.plan.plan_placement`; the
descriptor and row-building stages are light CPU tasks after it. Rows stream, and the run's object
store is bounded by the pool, not the archive (:func:`skinray.score.plan.object_store_budget`): the
graph writes its rows once, through :class:`skinray.score.commit.StagedRunSink`, into the run's
staging directory, for :func:`skinray.score.commit.commit_run` to publish.
"""

from __future__ import annotations

import os

from skinray.score.actors import PredictActor
from skinray.score.commit import StagedRunSink
from skinray.score.config import ScoreConfig
from skinray.score.plan import LIGHT_TASK_CPUS, WRITE_TASK_CPUS, Placement, ScoringModels
from skinray.score.sources import StagedListing
from skinray.score.stages import (
    KILL_ACTOR_MARKER_ENV,
    PREDICT_DELAY_ENV,
    describe_lesions,
    finish_rows,
    read_and_decode_listing_file,
)

__all__ = ["build_graph", "decoded_images", "write_staging"]


def decoded_images(listing: StagedListing, config: ScoreConfig, image_size: tuple[int, int]):
    """The staged listing files read and decoded by Ray Data tasks, one task a file, which
    yields its rows decoded ``decode_batch_size`` at a time. Each batch leaves the task as a block
    of its own (the dataset's block size target is one batch), so the model actors start on the
    first images of a file while the rest decode, and the object-store bound holds.

    The driver plans one task per listing file (a range of file indices) and never holds the
    listing. Earlier: a task per ``decode_batch_size`` slice of a listing put from the driver cost
    it 2.2 KiB an image (20,000 images: +44 MiB); Ray Data's Parquet read of the listing put its
    blocks in the object store, where at a million images they took the run's whole bound and the
    decode stage stalled."""
    import ray

    dataset = ray.data.range(listing.files, override_num_blocks=listing.files)
    height, width = image_size
    dataset.context.target_max_block_size = config.decode_batch_size * 4 * height * width
    return dataset.map_batches(
        read_and_decode_listing_file,
        batch_size=1,
        fn_kwargs={
            "listing_uri": listing.listing_uri,
            "rows": config.decode_batch_size,
            "image_size": tuple(image_size),
            "max_pixels": config.max_pixels,
            "jpeg_to_segmenter": config.jpeg_decode_in_segmenter,
        },
    )


def _model_stages(rows, config: ScoreConfig, placement: Placement, calibration_images=None):
    """Decoded rows through the ``PredictActor`` pool (segmenter, or segmenter → ROI → classifier,
    in one actor: the ROI is cut on its device from the decoded image; int8 calibrated on
    ``calibration_images``, an object reference), then the lesion descriptors and mask PNG on
    light CPU tasks."""
    return rows.map_batches(
        PredictActor,
        fn_constructor_kwargs={
            "segmenter": config.segmenter,
            "classifier": config.classifier,
            "batch_size": config.batch_size,
            "kill_marker": os.environ.get(KILL_ACTOR_MARKER_ENV),
            "test_delay_s": float(os.environ.get(PREDICT_DELAY_ENV) or 0),
            "cpu_threads": placement.cpu_threads,
            "backend": config.backend,
            "calibration_images": calibration_images,
        },
        batch_size=config.batch_size,
        **placement.pool_args(config),
    ).map_batches(describe_lesions, batch_size=config.decode_batch_size, num_cpus=LIGHT_TASK_CPUS)


def build_graph(
    listing: StagedListing,
    config: ScoreConfig,
    models: ScoringModels,
    placement: Placement,
    calibration_images=None,
):
    """The lazy ``ray.data.Dataset`` of output rows (results and errors alike) for a non-empty
    listing: decode → models → ``finish_rows``; ``calibration_images``: the object reference of
    int8's calibration images, read once for the run. Nothing runs until it is written."""
    rows = decoded_images(listing, config, models.input_size)
    rows = _model_stages(rows, config, placement, calibration_images)
    return rows.map_batches(
        finish_rows,
        batch_size=config.decode_batch_size,
        num_cpus=LIGHT_TASK_CPUS,
        fn_kwargs={
            "class_names": models.class_names,
            "models": models.identity,
            "run_id": config.run_id,
            "include_cam": config.include_cam,
        },
    )


def write_staging(
    rows, sink: StagedRunSink, object_store_budget: int
) -> dict[str, tuple[float, float]]:
    """Run the graph under ``object_store_budget`` bytes of object store, writing its rows through
    ``sink`` (``skinray.score.commit``) into the run's staging directory; the operators' times."""
    # Datasets snapshot the DataContext when created: this run's budget goes on its own copy.
    options = rows.context.execution_options
    options.resource_limits = options.resource_limits.copy(object_store_memory=object_store_budget)
    rows.write_datasink(sink, ray_remote_args={"num_cpus": WRITE_TASK_CPUS})  # see WRITE_TASK_CPUS
    return _operator_times(rows)


def _operator_times(dataset) -> dict[str, tuple[float, float]]:
    """Ray Data operator name → (summed task wall time, span), from the executed dataset."""

    def operators_of(summary):  # the write's summary holds the stages before it as parents
        for parent in summary.parents:
            yield from operators_of(parent)
        yield from summary.operators_stats

    try:
        operators = list(operators_of(dataset.get_stats_summary()))
    except Exception:  # stats are a report, never a reason to fail a finished run
        return {}
    times = {}
    for op in operators:
        if op.wall_time is None or op.earliest_start_time is None or op.latest_end_time is None:
            continue
        times[op.operator_name] = (
            float(op.wall_time.sum),
            float(op.latest_end_time - op.earliest_start_time),
        )
    return times
