"""The scoring job on an autoscaling cluster that starts with no worker node: Ray's own fake
multi-node autoscaler (the provider ``ray.cluster_utils.AutoscalingCluster`` runs) with a head that
takes no tasks, as in cluster.yaml, and one worker type that starts at 0 and may grow to 3."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pyarrow.dataset as pads
import pytest
import torch

from skinray.data.synthetic import synthetic_sample
from skinray.models import create_model, get_model_spec, save_model
from skinray.score.stages import PREDICT_DELAY_ENV
from tests.e2e.ray_heads import free_port, head_port_flags, stop_ray_under

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
#: 48 model calls of a second on one actor. Ray Data's cluster autoscaler asks for more nodes only
#: once it has measured the pool's rate (and at most every 10 s): about 25 s after the first node
#: came up, here and in CI. With 96 images, CI's single actor had finished by then.
IMAGES = 192
#: A GPU node type, as cluster.yaml's gpu_worker_1x (Ray's fake nodes declare the GPU; the actors
#: run on CPU here). The ceiling is 3 GPUs, so the pool may grow to 3 actors of a GPU each, and
#: each actor beyond the first needs a node of its own: a pool of more than one actor means the
#: cluster grew (with CPU actors, all 3 once fitted on the first node). 4 CPUs a node leave room
#: for the decode tasks beside an actor: on 2-CPU nodes the pool never grew past one actor.
WORKER = {"CPU": 4, "GPU": 1, "object_store_memory": 150 * 2**20}

#: Run in a fresh Python against the cluster: its worker nodes (alive or gone) and the actors that
#: held the model, as the GCS recorded them.
_CENSUS = """
import json, ray
from ray._private.state import state
ray.init(address="auto", logging_level="ERROR")
workers = [n for n in ray.nodes() if n["Resources"].get("CPU", 0) > 0]
actors = [a for a in state.actor_table(None).values() if "PredictActor" in a.get("ReprName", "") or
          "MapWorker" in a["ActorClassName"]]
print(json.dumps({"worker_nodes": len(workers), "model_actors": len(actors),
                  "actor_nodes": len({a["Address"]["NodeID"] for a in actors})}))
"""


def _fake_cluster_config(port: int) -> dict:
    """The config ``AutoscalingCluster`` generates (Ray's fake multi-node provider; its template
    is not in the wheel), with the provider pointed at this head's own GCS port."""
    return {
        "cluster_name": "skinray-autoscaling-test",
        "max_workers": 3,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{port}",
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {
                "resources": WORKER,
                "node_config": {},
                "min_workers": 0,
                "max_workers": 3,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "docker": {},
        **{key: [] for key in _EMPTY_LISTS},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }


_EMPTY_LISTS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
    "cluster_synced_files",
    "rsync_exclude",
    "rsync_filter",
)


@pytest.fixture
def autoscaling_head(tmp_path):
    """A head with ``CPU: 0`` and the fake provider's autoscaler, on ports and a temp folder of its
    own: started as ``AutoscalingCluster.start`` starts it, less its first step, ``ray stop
    --force``, which would kill every Ray on the machine."""
    port = free_port()
    config = _fake_cluster_config(port)
    # Where `ray up` leaves it on a head, and the driver (on the head) reads the pools' ceiling
    home = tmp_path / "home"
    home.mkdir()
    config_file = home / "ray_bootstrap_config.yaml"
    config_file.write_text(json.dumps(config))  # JSON is YAML
    temp_dir = Path("/tmp") / f"skinray-as-{os.getpid()}"  # short: Ray's socket paths have a limit
    env = {
        **os.environ,
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_AUTH_MODE": "disabled",
        "HOME": str(home),
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    flags = [f for f in head_port_flags() if not f.startswith("--port=")]
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        f"--port={port}",
        *flags,
        "--node-ip-address=127.0.0.1",
        f"--autoscaling-config={config_file}",
        "--num-cpus=0",
        "--include-dashboard=false",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=180)
    try:
        yield {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    finally:
        stop_ray_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _census(env) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _CENSUS], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_scoring_grows_an_empty_autoscaling_cluster_and_lands_every_input_once(
    autoscaling_head, tmp_path
):
    archive = tmp_path / "archive"
    archive.mkdir()
    for seed in range(IMAGES):
        rgb = synthetic_sample(seed, 96).image
        cv2.imwrite(str(archive / f"{seed:03d}.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    (archive / "broken.jpg").write_bytes(b"not a jpeg")
    torch.manual_seed(0)
    segmenter = create_model("unet", **get_model_spec("unet").smoke_kwargs)
    save_model(segmenter, str(tmp_path / "segmenter"), input_size=(64, 64))

    assert _census(autoscaling_head)["worker_nodes"] == 0  # nothing to run tasks on at the start
    output = tmp_path / "scored"
    command = [
        sys.executable,
        str(ROOT / "jobs" / "score.py"),
        "--input",
        str(archive),
        "--output",
        str(output),
        "--segmenter",
        str(tmp_path / "segmenter"),
        "--run-date",
        "2026-12-02",
        "--batch-size",
        "4",
        "--decode-batch-size",
        "8",  # many small blocks, as the pool's queue needs to back up
        "--cpu-threads",
        "1",
        "--backend",
        "eager",
        "--no-report",
    ]
    started = time.monotonic()
    done = subprocess.run(
        command,
        # a model call of 4 images waits a second: the pool's queue backs up, so it grows
        env={**autoscaling_head, PREDICT_DELAY_ENV: "1.0"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    census = _census(autoscaling_head)
    print(done.stdout, census)
    # sized by the ceiling, not by the nothing that was up at the start
    assert "up to 3 model actors, a GPU each" in done.stdout
    assert census["worker_nodes"] > 1, census
    assert census["model_actors"] > 1 and census["actor_nodes"] > 1, census

    tables = {
        table: pads.dataset(output / table, format="parquet", partitioning="hive").to_table()
        for table in ("results", "errors")
    }
    landed = sorted(
        Path(uri).name for table in tables.values() for uri in table["source_uri"].to_pylist()
    )
    assert landed == sorted([f"{seed:03d}.jpg" for seed in range(IMAGES)] + ["broken.jpg"])
    assert tables["errors"]["source_uri"].to_pylist() == [str(archive / "broken.jpg")]
    print(f"scored {IMAGES + 1} images in {time.monotonic() - started:.0f} s; {census}")
