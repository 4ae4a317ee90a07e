"""The scoring pipeline's pure parts: the object-store budget and the per-stage summary."""

from __future__ import annotations

import pytest

from skinray.score.config import make_score_config
from skinray.score.pipeline import StageSummary, _object_store_budget, _Placement, _stage_summaries


def _config(**extra):
    return make_score_config(input="in/", output="out/", segmenter="seg", **extra)


CPU_NODE = _Placement(use_gpu=False, max_actors=1, cpu_threads=2, decode_slots=2)


def test_budget_is_prefetched_batches_per_actor_plus_decode_outputs():
    config = _config(batch_size=16, decode_batch_size=8, prefetch_batches=4)
    # 4 batches × 16 rows × (256×256 RGB + mask, 224×224 RGB ROI) for one actor per stage, and
    # one 8-row output (RGB + mask) per decode slot.
    expected = 4 * 16 * (4 * 256 * 256 + 3 * 224 * 224) + 2 * 8 * 4 * 256 * 256
    assert _object_store_budget(config, CPU_NODE, (256, 256), (224, 224)) == expected


def test_budget_grows_with_the_pool_not_with_the_archive():
    config = _config()
    one = _object_store_budget(config, CPU_NODE, (256, 256), None)
    four = _object_store_budget(
        config, _Placement(True, max_actors=4, cpu_threads=1, decode_slots=2), (256, 256), None
    )
    queued = config.prefetch_batches * config.batch_size * 4 * 256 * 256
    assert four - one == 3 * queued


def test_configured_budget_wins():
    config = _config(object_store_memory_mib=48)
    assert _object_store_budget(config, CPU_NODE, (512, 512), (224, 224)) == 48 * 2**20


def test_stage_summary_follows_images_through_the_stages():
    stages = _stage_summaries(
        listed=100,
        skipped=10,
        errors_by_stage={"read": 2, "decode": 5, "segment": 1, "classify": 3},
        written=90,
        with_classifier=True,
        operator_times={
            "MapBatches(read_and_decode)": (12.0, 6.5),
            "MapBatches(SegmentActor)": (30.0, 31.0),
            "MapBatches(finish_rows)->Write": (1.0, 2.0),
        },
    )
    table = {s.stage: (s.images_in, s.errors, s.task_s, s.span_s) for s in stages}
    assert list(table) == ["list", "read", "decode", "segment", "roi", "classify", "write"]
    assert table["list"] == (100, 0, None, None)
    assert table["read"] == (90, 2, None, None)  # read and decode share one task: timed as decode
    assert table["decode"] == (88, 5, 12.0, 6.5)
    assert table["segment"] == (83, 1, 30.0, 31.0)
    assert table["roi"] == (82, 0, None, None)  # no timing reported for it here
    assert table["classify"] == (82, 3, None, None)
    assert table["write"] == (90, 0, 1.0, 2.0)


def test_stage_summary_without_a_classifier_has_no_classify_stage():
    stages = _stage_summaries(5, 0, {}, 5, with_classifier=False, operator_times={})
    assert [s.stage for s in stages] == ["list", "read", "decode", "segment", "roi", "write"]
    assert all(s.images_in == 5 for s in stages)


@pytest.mark.parametrize(
    ("summary", "line"),
    [
        (
            StageSummary("segment", 83, 1, 30.04, 31.0),
            "  segment         83 in       1 errors      30.0 s in tasks,   31.0 s span",
        ),
        (StageSummary("list", 100, 0), "  list           100 in       0 errors"),
    ],
)
def test_stage_line(summary, line):
    assert summary.line() == line
