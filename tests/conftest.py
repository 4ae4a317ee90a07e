"""Shared fixtures: synthetic data, and a real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import os
import uuid

import boto3
import pyarrow.fs as pafs
import pytest
import torch

from skinray import io

# pytest-xdist's workers share the cores: each gets its share of threads, not all of them. So do
# the jobs and benches a test starts in a subprocess, and its Ray cluster's workers, which inherit
# OMP_NUM_THREADS: two processes of two torch threads each on this 2-core machine ran a convolution
# at 6.0 iterations/s together, two of one thread at 9.6.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
torch.set_num_threads(THREADS)
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))


@pytest.fixture(scope="session")
def fitted_segmenter(tmp_path_factory) -> str:
    """A smoke U-Net fitted for 20 steps to synthetic lesions, saved at 64×64. A random one marks
    nearly every pixel lesion (98–99.9 %), so its ROIs are whole frames and any two masks agree;
    this one finds lesions, so ROI boxes and mask comparisons mean something. Shared by the
    session's tests: copy it before changing its config."""
    from skinray.data.synthetic import synthetic_batch
    from skinray.data.transforms import normalise
    from skinray.losses import LOSSES
    from skinray.models import MASK_LOGITS, create_model, get_model_spec, save_model

    torch.manual_seed(0)
    model = create_model("unet", **get_model_spec("unet").smoke_kwargs)
    images, masks, _ = synthetic_batch(16, (64, 64), seed=100)
    x = normalise(torch.from_numpy(images).permute(0, 3, 1, 2), *model.normalization)
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(20):
        loss = LOSSES["bce_dice"](model(x)[MASK_LOGITS], torch.from_numpy(masks).float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = str(tmp_path_factory.mktemp("fitted_segmenter"))
    save_model(model.eval(), folder, input_size=(64, 64))
    return folder


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (random port) with throwaway credentials in the environment."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in _AWS_ENV}
    os.environ.update(
        AWS_ACCESS_KEY_ID="skinray-test",
        AWS_SECRET_ACCESS_KEY="skinray-test-secret",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
    )
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_AWS_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the test server; yields its ``s3://`` prefix."""
    name = f"skinray-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture
def s3_filesystem(s3_server) -> pafs.S3FileSystem:
    return io.s3_filesystem(s3_server)
