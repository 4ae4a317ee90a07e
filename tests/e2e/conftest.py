"""A real local Ray cluster for the end-to-end tests (shared by every test in this folder)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """``ray.init`` on this machine; started after the S3 server so workers inherit its settings."""
    import ray

    # Four logical CPUs on a 2-core machine: two training workers plus Ray Data's read tasks.
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=True,
        ignore_reinit_error=True,
    )
    try:
        yield
    finally:
        ray.shutdown()
