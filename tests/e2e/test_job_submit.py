"""The training job as users submit it: ``ray start --head`` then ``ray job submit``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from tests.e2e.ray_heads import free_port, head_port_flags, stop_ray_under

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head(tmp_path):
    """A throwaway head node on loopback (token auth off: a private test cluster), stopped alone
    (``tests.e2e.ray_heads``)."""
    # The job's ``python`` must be this environment's, as on a cluster set up by cluster.yaml.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    dashboard_port = free_port()
    temp_dir = Path("/tmp") / f"skinray-ray-{os.getpid()}"  # short: Ray's socket paths have a limit
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        *head_port_flags(),
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        "--num-cpus=3",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dashboard_port}", env
    finally:
        stop_ray_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_smoke_test_succeeds_and_writes_the_model(ray_head, tmp_path, monkeypatch):
    address, env = ray_head
    output = tmp_path / "smoke"
    started = time.monotonic()
    command = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(ROOT),
        "--",
        "python",
        "jobs/train.py",
        "--smoke-test",
        "--output",
        str(output),
    ]
    for _ in range(12):  # the head's job agent may still be starting right after `ray start`
        result = subprocess.run(
            command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        if "No available agent to submit job" not in result.stderr:
            break
        time.sleep(5)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    job_id = re.search(r"Job '(raysubmit_\w+)' succeeded", result.stdout).group(1)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    client = JobSubmissionClient(address)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED
    assert "epoch 2/2" in result.stdout  # the per-epoch progress line reaches the submitter
    summary = json.loads((output / "metrics.json").read_text())
    assert [row["epoch"] for row in summary["history"]] == [1, 2]
    assert (output / "model" / "model.safetensors").stat().st_size > 0
    assert (output / "model" / "config.json").exists()
    assert time.monotonic() - started < 600
