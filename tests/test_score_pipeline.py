"""The scoring pipeline's parts that need no Ray: the object-store budget, the per-stage summary, and
the write tasks' staged files and their commit into the results and errors partitions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from skinray.score import plan
from skinray.score.commit import StagedRunSink, commit_run, remove_staging, staged_uris
from skinray.score.config import ScoreConfigError, make_score_config
from skinray.score.pipeline import StageSummary, _stage_summaries
from skinray.score.plan import OUTPUT_ROW_BYTES, ClusterShape, plan_placement
from skinray.score.plan import Placement as _Placement
from skinray.score.plan import object_store_budget as _object_store_budget
from skinray.score.schema import error_schema, result_schema
from skinray.score.sources import list_inputs, listing_rows_per_file, stage_listing


def _config(**extra):
    return make_score_config(**{"input": "in/", "output": "out/", "segmenter": "seg", **extra})


CPU_NODE = _Placement(use_gpu=False, max_actors=1, cpu_threads=2, decode_slots=2)


def test_budget_is_prefetched_batches_per_actor_plus_decode_outputs():
    config = _config(batch_size=16, decode_batch_size=8, prefetch_batches=4)
    # 4 batches × 16 rows × (256×256 RGB + mask) in and out of the one actor, one 8-row output
    # (RGB + mask) per decode slot, and a file's worth of finished rows for the write.
    expected = 4 * 16 * 2 * (4 * 256 * 256) + 2 * 8 * 4 * 256 * 256 + 10_000 * OUTPUT_ROW_BYTES
    assert _object_store_budget(config, CPU_NODE, (256, 256)) == expected


def test_budget_grows_with_the_pool_not_with_the_archive():
    config = _config()
    one = _object_store_budget(config, CPU_NODE, (256, 256))
    four = _object_store_budget(
        config, _Placement(True, max_actors=4, cpu_threads=1, decode_slots=2), (256, 256)
    )
    queued = config.prefetch_batches * config.batch_size * 2 * 4 * 256 * 256
    assert four - one == 3 * queued


def test_configured_budget_wins():
    config = _config(object_store_memory_mib=48)
    assert _object_store_budget(config, CPU_NODE, (512, 512)) == 48 * 2**20


#: The shapes of cluster.yaml: a head that takes no tasks, and up to 16 workers of which 8 are
#: 16-CPU nodes and 8 one-GPU nodes with 4 CPUs; nothing up when a run starts.
CLUSTER_YAML_AT_START = ClusterShape(cpus=0, gpus=0, node_cpus=48, max_cpus=160, max_gpus=16)
LAPTOP = ClusterShape(cpus=2, gpus=0, node_cpus=2, max_cpus=2, max_gpus=0)


def test_a_static_cpu_node_gets_one_actor_with_every_core():
    placement = plan_placement(_config(), LAPTOP)
    assert (placement.use_gpu, placement.max_actors, placement.cpu_threads) == (False, 1, 2)
    assert placement.decode_slots == 2
    assert not LAPTOP.autoscales


def test_pools_grow_to_the_autoscaling_clusters_ceiling_not_to_what_is_up_at_start():
    placement = plan_placement(_config(), CLUSTER_YAML_AT_START)
    assert CLUSTER_YAML_AT_START.autoscales
    assert placement.use_gpu  # GPU node types exist though none is up: GPU actors are asked for
    assert placement.max_actors == 16
    assert placement.decode_slots == 160  # decode tasks are not capped at the CPUs present (0)
    cpu_only = plan_placement(_config(use_gpu=False), CLUSTER_YAML_AT_START)
    assert (cpu_only.use_gpu, cpu_only.max_actors) == (False, 40)  # one CPU actor per 4 CPUs


def test_max_actors_caps_the_pool_and_threads_follow_it():
    shape = ClusterShape(cpus=0, gpus=0, node_cpus=16, max_cpus=48, max_gpus=0)
    assert plan_placement(_config(), shape).max_actors == 12
    capped = plan_placement(_config(max_actors=3), shape)
    # 3 actors over 3 possible 16-CPU nodes: one a node, with all its cores
    assert (capped.max_actors, capped.cpu_threads) == (3, 16)
    assert plan_placement(_config(max_actors=3, cpu_threads_per_actor=4), shape).cpu_threads == 4


def test_the_ceiling_of_cluster_yaml_is_read_from_its_node_types_and_worker_budget(
    tmp_path, monkeypatch
):
    root = Path(__file__).resolve().parents[1]
    monkeypatch.setattr(plan, "BOOTSTRAP_CONFIG", str(root / "cluster.yaml"))
    ceiling, type_cpus = plan._autoscaler_ceiling()
    # 16 workers at most: 2 × 4 GPUs + 8 × 1 GPU; CPUs 2 × 48 + 8 × 16 + the 6 nodes left × 4
    assert ceiling == {"GPU": 16, "CPU": 248}
    assert sorted(type_cpus) == [4, 16, 48]
    monkeypatch.setattr(plan, "BOOTSTRAP_CONFIG", str(tmp_path / "none.yaml"))
    assert plan._autoscaler_ceiling() == ({"CPU": 0, "GPU": 0}, [])


def test_pool_args_ask_for_a_gpu_per_actor_and_a_growing_pool():
    args = plan_placement(_config(), CLUSTER_YAML_AT_START).pool_args(_config())
    assert (args["num_gpus"], args["num_cpus"]) == (1, 1)
    assert (args["compute"].min_size, args["compute"].max_size) == (1, 16)


def test_stage_summary_follows_images_through_the_stages():
    stages = _stage_summaries(
        listed=100,
        skipped=10,
        errors_by_stage={"read": 2, "decode": 5, "predict": 4},
        written=90,
        operator_times={
            "MapBatches(read_and_decode)": (12.0, 6.5),
            "MapBatches(PredictActor)": (30.0, 31.0),
            "MapBatches(finish_rows)->Write": (1.0, 2.0),
        },
    )
    table = {s.stage: (s.images_in, s.errors, s.task_s, s.span_s) for s in stages}
    assert list(table) == ["list", "read", "decode", "predict", "describe", "write"]
    assert table["list"] == (100, 0, None, None)
    assert table["read"] == (90, 2, None, None)  # read and decode share one task: timed as decode
    assert table["decode"] == (88, 5, 12.0, 6.5)
    assert table["predict"] == (83, 4, 30.0, 31.0)
    assert table["describe"] == (79, 0, None, None)  # no timing reported for it here
    assert table["write"] == (90, 0, 1.0, 2.0)


@pytest.mark.parametrize(
    ("summary", "line"),
    [
        (
            StageSummary("predict", 83, 1, 30.04, 31.0),
            "  predict         83 in       1 errors      30.0 s in tasks,   31.0 s span",
        ),
        (StageSummary("list", 100, 0), "  list           100 in       0 errors"),
    ],
)
def test_stage_line(summary, line):
    assert summary.line() == line


def _staged_rows(uris: list[str], failed: set[str]) -> pa.Table:
    """Staged rows as ``finish_rows`` makes them, for a one-class model."""
    count = len(uris)
    bad = [u in failed for u in uris]
    columns = {
        f.name: pa.nulls(count, f.type) for f in result_schema(["nevus"]) if f.name != "source_uri"
    }
    columns["image_id"] = pa.array([u.rsplit("/", 1)[1] for u in uris])
    columns["run_id"] = pa.array(["r"] * count)
    columns["lesion_area_fraction"] = pa.array([float("nan")] * count, pa.float32())
    return pa.table(
        {
            "source_uri": uris,
            **columns,
            "error_stage": ["decode" if b else "" for b in bad],
            "error_type": ["CorruptImage" if b else "" for b in bad],
            "error_message": [f"{u}: bad" if b else "" for u in uris for b in [u in failed]],
        }
    )


def _stage(staging, *tables: pa.Table, first_task: int = 0) -> StagedRunSink:
    """The tables written as Ray Data's write tasks would write them, one task each."""
    sink = StagedRunSink(str(staging), ["nevus"], "r", rows_per_file=100)
    for task, table in enumerate(tables, start=first_task):
        sink.write([table], SimpleNamespace(task_idx=task))
    return sink


def _files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_write_task_writes_whole_files_in_the_fixed_schemas(tmp_path):
    uris = [f"s3://a/{i:03d}.jpg" for i in range(10)]
    rows = _staged_rows(uris, failed={uris[3], uris[7]})
    sink = _stage(tmp_path / "staging", rows.slice(0, 6), rows.slice(6))
    results, errors = tmp_path / "staging" / "results", tmp_path / "staging" / "errors"
    assert _files(results) == [f"part-r-{sink.attempt}-0000{t}.parquet" for t in (0, 1)]
    assert len(_files(errors)) == 2  # no partial (.tmp) file is left behind
    written = pads.dataset(results).to_table()
    assert sorted(written["source_uri"].to_pylist()) == sorted(set(uris) - {uris[3], uris[7]})
    assert written.schema == result_schema(["nevus"])
    assert written["lesion_area_fraction"].null_count == 8  # NaN is stored as null
    assert pq.read_schema(next(errors.iterdir())) == error_schema()


def test_a_retried_write_task_rewrites_its_own_file(tmp_path):
    uris = ["s3://a/1.jpg", "s3://a/2.jpg"]
    sink = _stage(tmp_path / "staging", _staged_rows(uris, set()))
    sink.write([_staged_rows(uris, set())], SimpleNamespace(task_idx=0))  # Ray reruns task 0
    assert pads.dataset(tmp_path / "staging" / "results").to_table().num_rows == 2


def _previous_partition(output, run_date="2026-11-24"):
    """A partition an earlier run committed: one result row (old.jpg) and one error row."""
    for table, schema, uri in (
        ("results", result_schema(["nevus"]), "s3://a/old.jpg"),
        ("errors", error_schema(), "s3://a/old-bad.jpg"),
    ):
        folder = output / table / f"run_date={run_date}"
        folder.mkdir(parents=True)
        row = {f.name: None for f in schema} | {"source_uri": uri, "run_id": "old", "image_id": "x"}
        if table == "errors":
            row |= {"stage": "decode", "error_type": "CorruptImage"}
        pq.write_table(pa.Table.from_pylist([row], schema), folder / "part-old-00000.parquet")


def _commit(output, **settings):
    config = _config(output=str(output), run_id="r", run_date="2026-11-24", **settings)
    return commit_run(str(output / "_staging" / "r"), config, ["nevus"])


def test_the_commit_replaces_the_partition_from_the_staged_files_alone(tmp_path):
    output = tmp_path / "out"
    _previous_partition(output)
    uris = [f"s3://a/{i}.jpg" for i in range(5)]
    _stage(output / "_staging" / "r", _staged_rows(uris, failed={uris[4]}))
    committed = _commit(output)
    assert (committed.results, committed.errors) == (4, 1)
    assert committed.errors_by_type == {"CorruptImage": 1} and committed.errors_by_stage == {
        "decode": 1
    }
    partition = output / "results" / "run_date=2026-11-24"
    assert all(name.startswith("part-r-") for name in _files(partition))  # the old run's file went
    assert sorted(pads.dataset(partition).to_table()["source_uri"].to_pylist()) == uris[:4]
    remove_staging(str(output / "_staging" / "r"))
    assert not (output / "_staging").exists()


def test_an_incremental_commit_adds_results_and_replaces_errors(tmp_path):
    output = tmp_path / "out"
    _previous_partition(output)
    _stage(output / "_staging" / "r", _staged_rows(["s3://a/new.jpg"], set()))
    _commit(output, incremental=True)
    results = pads.dataset(output / "results" / "run_date=2026-11-24").to_table()
    assert sorted(results["source_uri"].to_pylist()) == ["s3://a/new.jpg", "s3://a/old.jpg"]
    errors = pads.dataset(output / "errors" / "run_date=2026-11-24").to_table()
    assert (
        errors.num_rows == 0 and errors.schema == error_schema()
    )  # an empty file, with its schema


def test_an_incremental_commit_replaces_the_rows_of_the_images_it_scored_again(tmp_path):
    # old.jpg changed since the date's earlier run (another ETag): scored again, its new row or
    # its new error replaces the old row, so each image is in one table, once, per date.
    for outcome in ("result", "error"):
        output = tmp_path / outcome
        _previous_partition(output)
        staged = _staged_rows(["s3://a/old.jpg", "s3://a/new.jpg"], set())
        if outcome == "error":
            staged = _staged_rows(["s3://a/old.jpg", "s3://a/new.jpg"], {"s3://a/old.jpg"})
        _stage(output / "_staging" / "r", staged)
        _commit(output, incremental=True)
        results = pads.dataset(output / "results" / "run_date=2026-11-24").to_table()
        errors = pads.dataset(output / "errors" / "run_date=2026-11-24").to_table()
        found = sorted(results["source_uri"].to_pylist() + errors["source_uri"].to_pylist())
        assert found == ["s3://a/new.jpg", "s3://a/old.jpg"], outcome
        assert set(results["run_id"].to_pylist()) == {"r"}, outcome


def test_a_run_dead_before_its_commit_leaves_the_partition_and_its_staged_rows(tmp_path):
    output = tmp_path / "out"
    _previous_partition(output)
    before = {p: p.read_bytes() for p in (output / "results").rglob("*.parquet")}
    uris = [f"s3://a/{i}.jpg" for i in range(4)]
    _stage(output / "_staging" / "r", _staged_rows(uris[:2], set()))  # the driver dies here
    assert {p: p.read_bytes() for p in (output / "results").rglob("*.parquet")} == before
    assert sorted(staged_uris(str(output / "_staging" / "r")).to_pylist()) == uris[:2]
    # The run id again: a new driver stages the rest under new names, and the commit takes both.
    _stage(output / "_staging" / "r", _staged_rows(uris[2:], set()))
    committed = _commit(output)
    partition = pads.dataset(output / "results" / "run_date=2026-11-24").to_table()
    assert committed.results == 4 and sorted(partition["source_uri"].to_pylist()) == uris


def test_error_rows_whose_size_was_never_read_get_a_null_size(tmp_path):
    # Ray turns a block's all-None column into float NaN: the int64 column must take it as null.
    uris = ["s3://a/gone-1.jpg", "s3://a/gone-2.jpg"]
    staged = _staged_rows(uris, failed=set(uris)).drop_columns(["source_size_bytes"])
    staged = staged.append_column("source_size_bytes", pa.array([float("nan")] * 2))
    _stage(tmp_path / "staging", staged)
    written = pads.dataset(tmp_path / "staging" / "errors").to_table()
    assert written["source_size_bytes"].to_pylist() == [None, None]
    assert written["source_uri"].to_pylist() == uris


def test_a_block_of_error_rows_alone_joins_the_other_blocks_of_its_file(tmp_path):
    # Found by the autoscaling test: a block holding only error rows carries backend (None in
    # every row) as float NaN, the other blocks carry strings, and the write task failed.
    good = _staged_rows(["s3://a/ok.jpg"], set())
    bad = _staged_rows(["s3://a/gone.jpg"], {"s3://a/gone.jpg"})
    if "backend" not in good.column_names:
        good = good.append_column("backend", pa.array(["eager"]))
        bad = bad.append_column("backend", pa.array([float("nan")]))
    else:
        index = bad.schema.get_field_index("backend")
        bad = bad.set_column(index, "backend", pa.array([float("nan")]))
    sink = StagedRunSink(str(tmp_path / "staging"), ["nevus"], "r", rows_per_file=100)
    assert sink.write([good, bad], SimpleNamespace(task_idx=0)) == {"results": 1, "errors": 1}
    results = pads.dataset(tmp_path / "staging" / "results").to_table()
    assert results["source_uri"].to_pylist() == ["s3://a/ok.jpg"]


def test_the_listing_is_staged_in_order_without_duplicates_or_what_a_dead_driver_staged(tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    for i in range(5):
        (archive / f"{i}.jpg").write_bytes(b"x" * (i + 1))
    manifest = tmp_path / "list.txt"
    names = ["3.jpg", "0.jpg", "3.jpg", "4.jpg", "1.jpg", "2.jpg", "0.jpg"]  # repeats
    manifest.write_text("".join(f"archive/{name}\n" for name in names))
    output = tmp_path / "out"
    staging = output / "_staging" / "r"
    already = [str(archive / "4.jpg"), str(archive / "1.jpg")]
    _stage(staging, _staged_rows(already, set()))  # a dead driver staged these

    config = _config(input=str(manifest), output=str(output))
    listing = stage_listing(config, str(staging), {}, decode_batch_size=2, use_gpu=False)
    assert (listing.listed, listing.resumed_from_staging, listing.to_score) == (5, 2, 3)
    assert listing.files == 2  # 2 rows a file: ceil(3 / 64) rows raised to the decode batch
    rows = pads.dataset(tmp_path / "out" / "_staging" / "r" / "listing").to_table()
    assert [Path(u).name for u in rows["source_uri"].to_pylist()] == ["3.jpg", "0.jpg", "2.jpg"]
    assert listing.mean_source_bytes == (4 + 1 + 3) / 3


def _scored_before(folder, listing: pa.Table, decodes: dict[str, str | None], classifier="c"):
    """A results file of an earlier run: rows for the listed images named in ``decodes``, made
    by segmenter config ``s`` and ``classifier``, from input made by the decoder named (None:
    a file written before results recorded their decoder)."""
    rows = [
        {**row, "segmenter_config_sha256": "s", "classifier_config_sha256": classifier}
        | ({"decode": decodes[Path(row["source_uri"]).name]} if decodes.get("_schema") else {})
        for row in listing.to_pylist()
        if Path(row["source_uri"]).name in decodes
    ]
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "part-old-00000.parquet")


@pytest.mark.parametrize(
    ("jpeg_decode_in_segmenter", "use_gpu", "skipped"),
    [
        (False, False, {"1.jpg"}),
        (True, False, {"1.jpg", "2.jpg"}),
        (True, True, {"1.jpg", "4.jpg"}),
    ],
)
def test_an_incremental_run_keeps_rows_of_its_models_decoded_as_it_would_decode(
    tmp_path, jpeg_decode_in_segmenter, use_gpu, skipped
):
    archive = tmp_path / "archive"
    archive.mkdir()
    for i in range(6):
        (archive / f"{i}.jpg").write_bytes(b"x" * (i + 1))
    listing = list_inputs(str(archive))
    results = tmp_path / "out" / "results"
    # The first file found is from before the decode column: it must not hide the column.
    _scored_before(results / "run_date=2026-11-20", listing, {"0.jpg": None})
    decodes = {
        "_schema": True,
        "1.jpg": "opencv",
        "2.jpg": "torchvision-cpu",
        "4.jpg": "torchvision-cuda",
    }
    _scored_before(results / "run_date=2026-11-23", listing, decodes)
    _scored_before(
        results / "run_date=2026-11-24", listing, {"_schema": True, "3.jpg": "opencv"}, "other"
    )

    config = _config(
        input=str(archive),
        output=str(tmp_path / "out"),
        incremental=True,
        jpeg_decode_in_segmenter=jpeg_decode_in_segmenter,
    )
    models = {"segmenter_config_sha256": "s", "classifier_config_sha256": "c"}
    staging = str(tmp_path / "out" / "_staging" / "r")
    staged = stage_listing(config, staging, models, decode_batch_size=8, use_gpu=use_gpu)
    assert staged.skipped_already_scored == len(skipped)
    rows = pads.dataset(Path(staging) / "listing").to_table()
    assert {Path(u).name for u in rows["source_uri"].to_pylist()} == {
        f"{i}.jpg" for i in range(6)
    } - skipped


@pytest.mark.parametrize(
    ("count", "rows"), [(0, 8), (440, 8), (20_000, 313), (262_144, 4096), (1_000_000, 4096)]
)
def test_listing_files_give_up_to_64_read_tasks_until_they_hold_4096_rows(count, rows):
    assert listing_rows_per_file(count, decode_batch_size=8) == rows


_INIT_AND_READ_WORKER_ENV = """
import os, ray
from skinray.score.pipeline import _init_ray
_init_ray()
print(ray.get(ray.remote(lambda: os.environ.get("RAY_num_workers_soft_limit")).remote()))
ray.shutdown()
"""


@pytest.mark.parametrize("user_value", [None, "3"])
def test_a_local_ray_started_by_the_job_keeps_the_idle_workers_its_stages_need(user_value):
    # The raylet reads RAY_* settings from its environment, and its workers inherit that
    # environment: a task's view shows what the raylet was started with.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    if user_value:
        env["RAY_num_workers_soft_limit"] = user_value
    worker = subprocess.run(
        [sys.executable, "-c", _INIT_AND_READ_WORKER_ENV],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert worker.returncode == 0, worker.stderr[-2000:]
    expected = user_value or str(plan.IDLE_WORKERS_PER_CPU * (os.cpu_count() or 1))
    assert worker.stdout.strip().splitlines()[-1] == expected


def test_an_input_that_lists_no_files_is_refused_before_its_commit_could_empty_the_date(tmp_path):
    # A typo'd s3:// prefix lists empty as an empty folder does: committed, the run would have
    # replaced the date's results and errors with empty partitions.
    empty = tmp_path / "archive"
    empty.mkdir()
    config = _config(input=str(empty), output=str(tmp_path / "out"))
    with pytest.raises(ScoreConfigError, match=f"^{empty}: no files to score$"):
        stage_listing(config, str(tmp_path / "out" / "_staging" / "r"), {}, 8, use_gpu=False)


def _earlier_results_file(output, uris: list[str]) -> None:
    """One results file of an earlier run ("old") on the date, a row for each of ``uris``."""
    folder = output / "results" / "run_date=2026-11-24"
    folder.mkdir(parents=True)
    schema = result_schema(["nevus"])
    rows = [
        {f.name: None for f in schema} | {"source_uri": u, "run_id": "old", "image_id": "x"}
        for u in uris
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema), folder / "part-old-00000.parquet")


@pytest.mark.parametrize("crash", [None, "after the rewrite", "after a move"])
def test_an_incremental_commit_repeated_after_a_crash_keeps_each_image_once(tmp_path, crash):
    # The earlier file holds a, b and c; this run scored b again and d, staged by two tasks.
    # A commit that died part-way and ran again must leave a, c from the earlier run and b, d
    # from this one: no second copy of the rewritten file, no old row beside a moved new one.
    from skinray.score import commit

    output = tmp_path / "out"
    _earlier_results_file(output, ["s3://a/a.jpg", "s3://a/b.jpg", "s3://a/c.jpg"])
    staging = output / "_staging" / "r"
    _stage(staging, _staged_rows(["s3://a/b.jpg"], set()), _staged_rows(["s3://a/d.jpg"], set()))
    partition = output / "results" / "run_date=2026-11-24"
    if crash == "after the rewrite":
        files = [str(partition / "part-old-00000.parquet")]
        uris = commit.staged_uris(str(staging))
        commit._rewritten_without(files, pafs.LocalFileSystem(), str(partition), uris, "r")
    elif crash == "after a move":
        first = sorted((staging / "results").iterdir())[0]
        first.rename(partition / first.name)
    _commit(output, incremental=True)
    rows = pads.dataset(partition).to_table()
    found = sorted(zip(rows["source_uri"].to_pylist(), rows["run_id"].to_pylist(), strict=True))
    assert found == [
        ("s3://a/a.jpg", "old"),
        ("s3://a/b.jpg", "r"),
        ("s3://a/c.jpg", "old"),
        ("s3://a/d.jpg", "r"),
    ]
    assert not list(partition.glob("*.tmp"))
