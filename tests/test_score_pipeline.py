"""The scoring pipeline's parts that need no Ray: the object-store budget, the per-stage summary, and
the streaming split of staged rows into the results and errors partitions."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from skinray.score.commit import PartitionWriter as _PartitionWriter
from skinray.score.commit import split_staged as _split_staged
from skinray.score.config import make_score_config
from skinray.score.pipeline import StageSummary, _stage_summaries
from skinray.score.plan import Placement as _Placement
from skinray.score.plan import object_store_budget as _object_store_budget
from skinray.score.schema import error_schema, result_schema


def _config(**extra):
    return make_score_config(input="in/", output="out/", segmenter="seg", **extra)


CPU_NODE = _Placement(use_gpu=False, max_actors=1, cpu_threads=2, decode_slots=2)


def test_budget_is_prefetched_batches_per_actor_plus_decode_outputs():
    config = _config(batch_size=16, decode_batch_size=8, prefetch_batches=4)
    # 4 batches × 16 rows × (256×256 RGB + mask) in and out of the one actor, and one 8-row
    # output (RGB + mask) per decode slot.
    expected = 4 * 16 * 2 * (4 * 256 * 256) + 2 * 8 * 4 * 256 * 256
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


def _split(tmp_path, *staged_files: pa.Table, rows_per_file: int = 100):
    """The staged tables written as staging files, split into ``results/`` and ``errors/`` under
    ``tmp_path``: (results writer, errors writer, errors by type, errors by stage)."""
    staging = tmp_path / "staging"
    staging.mkdir()
    for index, table in enumerate(staged_files):
        pq.write_table(table, staging / f"{index}.parquet")
    results = _PartitionWriter(
        str(tmp_path / "results"), result_schema(["nevus"]), "r", rows_per_file, replace=True
    )
    errors = _PartitionWriter(
        str(tmp_path / "errors"), error_schema(), "r", rows_per_file, replace=True
    )
    by_type, by_stage = _split_staged(pads.dataset(staging), results, errors)
    results.close()
    errors.close()
    return results, errors, by_type, by_stage


def test_split_streams_rows_into_files_of_bounded_size(tmp_path):
    uris = [f"s3://a/{i:03d}.jpg" for i in range(10)]
    rows = _staged_rows(uris, failed={uris[3], uris[7]})
    results, errors, by_type, by_stage = _split(
        tmp_path, rows.slice(0, 6), rows.slice(6), rows_per_file=3
    )
    assert (results.rows, errors.rows) == (8, 2)
    assert by_type == {"CorruptImage": 2} and by_stage == {"decode": 2}
    files = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert files == [f"part-r-{i:05d}.parquet" for i in range(3)]  # 3 + 3 + 2 rows
    written = pads.dataset(tmp_path / "results").to_table()
    assert sorted(written["source_uri"].to_pylist()) == sorted(set(uris) - {uris[3], uris[7]})
    assert written["lesion_area_fraction"].null_count == 8  # NaN is stored as null
    assert pq.read_schema(tmp_path / "errors" / "part-r-00000.parquet") == error_schema()


def test_a_repeated_row_is_written_once(tmp_path):
    uris = ["s3://a/1.jpg", "s3://a/2.jpg"]
    # The second file holds a rerun task's row.
    results, *_ = _split(tmp_path, _staged_rows(uris, set()), _staged_rows(uris[:1], set()))
    assert results.rows == 2
    assert sorted(pads.dataset(tmp_path / "results").to_table()["source_uri"].to_pylist()) == uris


def test_an_empty_partition_still_has_a_file_with_its_schema_and_replaces_the_old(tmp_path):
    target = tmp_path / "errors"
    target.mkdir()
    (target / "part-old-00000.parquet").write_bytes(b"stale")
    writer = _PartitionWriter(str(target), error_schema(), "new", 10, replace=True)
    writer.close()
    assert [p.name for p in target.iterdir()] == ["part-new-00000.parquet"]
    assert pq.read_table(target / "part-new-00000.parquet").schema == error_schema()


def test_error_rows_whose_size_was_never_read_get_a_null_size(tmp_path):
    # Ray turns a block's all-None column into float NaN: the int64 column must take it as null.
    uris = ["s3://a/gone-1.jpg", "s3://a/gone-2.jpg"]
    staged = _staged_rows(uris, failed=set(uris)).drop_columns(["source_size_bytes"])
    staged = staged.append_column("source_size_bytes", pa.array([float("nan")] * 2))
    _split(tmp_path, staged)
    written = pq.read_table(tmp_path / "errors" / "part-r-00000.parquet")
    assert written["source_size_bytes"].to_pylist() == [None, None]
    assert written["source_uri"].to_pylist() == uris
