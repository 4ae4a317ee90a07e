"""cluster.yaml passes the checks `ray up` runs on it, without AWS, and keeps skinray's promises.

`ray up` (ray.autoscaler._private.commands.create_or_update_cluster → _bootstrap_config) does:
  1. yaml.safe_load the file;
  2. prepare_config(config): merge with ray/autoscaler/aws/defaults.yaml (a file in the wheel),
     merge setup commands, check the docker section, fill per-type min/max workers — all local;
  3. AWSNodeProvider.fillout_available_node_types_resources: describe-instance-types on EC2 to
     fill missing `resources` — calls AWS, and `ray up` only warns if it fails;
  4. validate_config(config): jsonschema against ray/autoscaler/ray-schema.json plus the
     cross-field checks (head type is a node type, sum of min_workers <= max_workers) — local;
  5. AWSNodeProvider.bootstrap_config: IAM role, key pair, subnets, security group — calls AWS.
The tests run 1, 2 and 4 (validate_config(prepare_config(...))): the same functions, in the same
order. Steps 3 and 5 need AWS, so cluster.yaml declares `resources` itself (the schema requires
them once step 3 is skipped), and a guard refuses any network connection during validation.
"""

from __future__ import annotations

import copy
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from skinray.score.plan import ray_node_environment

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"

# vCPUs and GPUs of the instance types cluster.yaml uses (AWS instance-type pages). `ray up` would
# look these up on EC2; declared resources override what it finds, so a wrong number here would
# schedule work onto GPUs or cores that do not exist.
INSTANCE_HARDWARE = {
    "m6i.2xlarge": {"CPU": 8, "GPU": 0},
    "c6i.4xlarge": {"CPU": 16, "GPU": 0},
    "g5.xlarge": {"CPU": 4, "GPU": 1},
    "g5.12xlarge": {"CPU": 48, "GPU": 4},
}

COMMAND_LISTS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


@pytest.fixture
def raw_config() -> dict[str, Any]:
    """cluster.yaml as `ray up` reads it."""
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if anything tries to reach AWS (or anywhere else)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"cluster config validation tried to use the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def validate_like_ray_up(config: dict[str, Any]) -> dict[str, Any]:
    """Steps 2 and 4 of `ray up` (see the module docstring); returns the filled-out config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: node_type
        for name, node_type in config["available_node_types"].items()
        if name != config["head_node_type"]
    }


# Ray's own validation


@pytest.mark.usefixtures("no_network")
def test_the_network_guard_refuses_connections():
    with socket.socket() as sock, pytest.raises(AssertionError, match="network"):
        sock.connect(("127.0.0.1", 9))


@pytest.mark.usefixtures("no_network")
def test_cluster_yaml_passes_the_validation_ray_up_runs(raw_config):
    prepared = validate_like_ray_up(raw_config)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["cluster_name"] == "skinray"


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda config: config.update(max_worker=16), "Additional properties"),
        (lambda config: config.update(max_workers="sixteen"), "is not of type 'integer'"),
        (
            lambda config: config["available_node_types"]["gpu_worker_1x"].pop("resources"),
            "required",
        ),
        (
            lambda config: config["available_node_types"]["cpu_worker"].update(min_worker=0),
            "Additional",
        ),
    ],
    ids=[
        "unknown-top-level-key",
        "max-workers-not-an-integer",
        "node-type-without-resources",
        "typo-in-node-type",
    ],
)
def test_a_broken_copy_fails_the_same_validation(raw_config, breakage, message):
    breakage(raw_config)
    with pytest.raises(jsonschema.ValidationError, match=message):
        validate_like_ray_up(raw_config)


@pytest.mark.usefixtures("no_network")
def test_a_head_type_missing_from_node_types_fails_ray_validation(raw_config):
    raw_config["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_like_ray_up(raw_config)


# What skinray's cluster promises


def test_the_head_node_type_is_one_of_the_node_types(raw_config):
    assert raw_config["head_node_type"] in raw_config["available_node_types"]


def test_the_head_runs_drivers_but_no_tasks(raw_config):
    head = raw_config["available_node_types"][raw_config["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0


def test_every_worker_type_scales_from_zero(raw_config):
    workers = worker_types(raw_config)
    assert workers
    for name, node_type in workers.items():
        assert node_type.get("min_workers") == 0, name


def test_some_worker_type_has_gpus(raw_config):
    gpu_types = {
        name for name, t in worker_types(raw_config).items() if t["resources"].get("GPU", 0) > 0
    }
    assert gpu_types, "no worker type declares GPU resources"


def test_declared_resources_match_the_instance_hardware(raw_config):
    for name, node_type in worker_types(raw_config).items():
        instance_type = node_type["node_config"]["InstanceType"]
        assert instance_type in INSTANCE_HARDWARE, (
            f"{name}: add {instance_type} to INSTANCE_HARDWARE"
        )
        hardware = INSTANCE_HARDWARE[instance_type]
        declared = {
            "CPU": node_type["resources"].get("CPU", 0),
            "GPU": node_type["resources"].get("GPU", 0),
        }
        assert declared == hardware, f"{name} ({instance_type}) declares {declared}, has {hardware}"


def test_every_command_list_is_ours_not_rays_aws_defaults(raw_config):
    # Unset lists are filled from ray/autoscaler/aws/defaults.yaml, which pip-installs into the
    # system Python on the head.
    missing = [key for key in COMMAND_LISTS if key not in raw_config]
    assert not missing, f"set these in cluster.yaml (even to []): {missing}"


def test_setup_installs_the_synced_skinray_tree(raw_config):
    assert raw_config["file_mounts"].get("~/skinray") == "."
    installs = [cmd for cmd in raw_config["setup_commands"] if "pip install" in cmd]
    assert any("-e ~/skinray" in cmd for cmd in installs), installs


def test_the_cluster_runs_the_ray_version_that_launches_it(raw_config):
    pins = re.findall(r"ray\[[a-z,]+\]==([\w.]+)", " ".join(raw_config["setup_commands"]))
    assert pins == [ray.__version__], f"pin ray=={ray.__version__} in setup_commands (found {pins})"


def test_every_node_starts_ray_with_token_auth(raw_config):
    assert raw_config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [cmd for cmd in raw_config[key] if "ray start" in cmd]
        assert starts, key
        for cmd in starts:
            assert "RAY_AUTH_MODE=token" in cmd, cmd
    assert "RAY_AUTH_MODE=disabled" not in CLUSTER_YAML.read_text()


def test_worker_nodes_keep_the_idle_workers_the_scoring_stages_need(raw_config):
    # The variable must sit in the same shell command as `ray start`, which the raylet inherits.
    starts = [cmd for cmd in raw_config["worker_start_ray_commands"] if "ray start" in cmd]
    setting = re.findall(r"RAY_num_workers_soft_limit=(\$\(\( \$\(nproc\) \* \d+ \)\))", starts[0])
    assert setting, starts[0]
    node = subprocess.run(["bash", "-c", f"echo {setting[0]}"], capture_output=True, text=True)
    assert {"RAY_num_workers_soft_limit": node.stdout.strip()} == ray_node_environment(
        os.cpu_count() or 1
    )


# No secrets in the file

_SECRET_PATTERNS = (
    re.compile(r"aws_secret_access_key", re.IGNORECASE),
    re.compile(r"aws_access_key_id", re.IGNORECASE),
    re.compile(r"AKIA[0-9A-Z]{16}"),  # an AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
)


def find_secrets(text: str) -> list[str]:
    return [match.group(0) for pattern in _SECRET_PATTERNS for match in pattern.finditer(text)]


def test_cluster_yaml_holds_no_aws_credentials(raw_config):
    assert find_secrets(CLUSTER_YAML.read_text()) == []
    assert "aws_credentials" not in raw_config["provider"]
    assert "ssh_private_key" not in raw_config.get("auth", {})


@pytest.mark.parametrize(
    "leak",
    [
        "aws_secret_access_key: x",
        "AWS_ACCESS_KEY_ID=x",
        "key: AKIA" + "ABCDEFGHIJ234567",  # assembled so this file holds no key-shaped string
        "-----BEGIN RSA " + "PRIVATE KEY-----",
    ],
)
def test_the_secret_scan_catches_credentials(leak):
    assert find_secrets(leak)
