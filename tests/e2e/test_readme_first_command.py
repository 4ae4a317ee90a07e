"""The README's first command: the released models score the shipped CC0 example images on a local
Ray cluster, print the summary with the classes, and write the HTML report."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]


def test_the_first_command_scores_the_examples_and_writes_the_report(tmp_path):
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)```", readme, flags=re.S).group(1).strip()
    assert first.endswith("jobs/score.py --output runs/example"), first
    # The install part has run (this is the test environment); run the job as written, elsewhere.
    result = subprocess.run(
        [sys.executable, "jobs/score.py", "--output", str(tmp_path / "example")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert re.search(r"listed\s+8 images", out) and re.search(r"results\s+8 ", out), out
    assert re.search(r"errors\s+0 ", out), out
    classes = re.search(r"classes\s+(.*)", out).group(1)
    assert sum(int(n) for n in re.findall(r"\b(\d+)\b", classes)) == 8, classes
    report = Path(re.search(r"report\s+(\S+)", out).group(1))
    assert report.is_file() and report.read_text().count("<img") >= 8

    # The README's example queries run as written on this output.
    import duckdb

    queries = re.findall(r"```sql\n(.*?)```", readme, flags=re.S)
    per_class, melanoma, untrusted, failures = (
        duckdb.sql(q.replace("runs/example", str(tmp_path / "example"))).fetchall() for q in queries
    )
    counted = dict(re.findall(r"(\w+) (\d+)", classes))
    assert {c: str(n) for _, c, n in per_class} == counted
    assert len(melanoma) == min(10, int(counted.get("mel", 0)))
    rows = pq.read_table(tmp_path / "example" / "results").to_pylist()
    flagged = [r for r in rows if r["ood"] or (r["class_entropy"] or 0) > 0.5]
    assert sorted(r[0] for r in untrusted) == sorted(r["image_id"] for r in flagged)
    assert failures == []
