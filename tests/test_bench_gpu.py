"""bench/score_gpu.py waits for the day a GPU is lent: its CPU smoke run keeps it working till then
(it once broke unnoticed when a function it shares with bench/score_pipeline.py changed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from skinray.score.config import make_score_config
from skinray.score.plan import read_scoring_models

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_bench_runs_its_cpu_smoke_test_on_the_shipped_models(tmp_path):
    out = tmp_path / "score_gpu.json"
    command = [
        sys.executable,
        str(REPO / "bench" / "score_gpu.py"),
        *("--device", "cpu", "--n", "4", "--batch-sizes", "4", "--skip-pipeline"),
        *("--workdir", str(tmp_path / "work"), "--out", str(out)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["errors"] == []
    shipped = read_scoring_models(
        make_score_config(
            input="in/",
            output="out/",
            segmenter="lesion-segmenter",
            classifier="ham10000-classifier",
        )
    ).identity
    assert {key: results["settings"][key] for key in shipped} == shipped
    models = results["models"]
    assert models["eager_bs4"]["images"] == 4 and models["eager_bs4"]["images_per_s"] > 0
    assert models["compile_bs4"]["backend"] == "compile"
    assert models["compile_bs4"]["guard"]["passed"], models["compile_bs4"]["guard"]
    assert models["compile_bs4"]["guard"]["mask_jaccard"] >= 0.99
    # bf16 autocast is judged by the guard: the released classifier's probabilities move under it,
    # so the actor drops to eager-mixed (its segmenter alone in bf16) and the record says so.
    bf16 = models["eager-bf16_bs4"]
    assert bf16["backend"] == "eager-mixed", bf16
    assert bf16["fallback_reason"].startswith("eager-bf16 failed the accuracy guard")
    assert models["eager-mixed_bs4"]["guard"]["passed"], models["eager-mixed_bs4"]["guard"]
    decode = results["decode"]
    assert decode["cpu_read_and_decode"]["images_per_s"] > 0
    assert decode["cpu_decode_jpegs_bs4"]["images_per_s"] > 0
