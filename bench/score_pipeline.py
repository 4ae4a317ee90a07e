"""Scoring pipeline benchmark: memory over N and 10×N images, throughput against its parts.

    .venv/bin/python bench/score_pipeline.py [--n 110] [--workdir /work/runs/bench_score] \\
        [--json /work/runs/bench_score/results.json]

Inputs: N and 10×N real full-resolution ISIC images (symlinks with distinct names to
../shared/data/isic2017_fullres/images; the N set spans the archive's pixel counts evenly — at the
default N = 440 it is every image there four times —, the 10×N set is the N set repeated ten times,
so both have the same mix of sizes). N must be large enough for the pipeline to reach its steady
state (decoding runs ahead of the models until the run's object-store bound holds it): with the
default bound of 54 MiB, 110 images (21 MB decoded) never reach it, so the N figure would be the
data size, not the ceiling. Models (``--model-set``, ``save_models``): by default the shipped
lesion segmenter and the shipped HAM10000 classifier (until that is released, a freshly initialised
ROI classifier of its recipe's kind); ``random`` gives the earlier figures' random U-Net ResNet-34 at
256×256 and ResNet-18 ROI classifier at 224×224.

Memory: ``run_scoring`` over N and over 10×N images, each in its own Python process and its own
``ray.init(num_cpus=2)``, while a thread samples every 0.25 s the driver's RSS, the summed RSS of
the Ray worker processes (``ray::…`` workers and actors, Ray Data's own actors included; the GCS,
raylet, dashboard and agents are summed apart as "system") and the object store's bytes in use
(the raylet's ``GetNodeStats`` store stats, as ``ray memory --stats-only`` reads them).

Throughput on the N set, in one further process and ``ray.init``: (a) the pipeline's
``read_and_decode`` stage alone as a Ray Data ``map_batches``; (b) the segmenter and the classifier
alone on pre-decoded images in the driver (same batch size), on every backend, each with its
accuracy guard against eager (``openvino-int8`` calibrated on ISIC 2017 training images,
``CALIBRATION_IMAGES``, none of them among the measured ones); (a) and (b) at the size the pipeline
decodes to; (c) the full pipeline; (d) the plain pattern of Ray's batch-inference docs:
``read_images(size=<the segmenter's input>)`` then ``map_batches`` with a callable class running the
same two models (the classifier on the resized whole image, no ROI) with the same torch threads as
(b) and the pipeline's actors, run over 10×N too; (e) each stage's cost on one core without Ray
(decode, the models on one thread, describe and rows) and the floor it sets: the rate the cores
would reach doing that work and nothing else; (f) that floor measured: one process a core, no
Ray, each running the whole path over its share of the images after a warm-up. The rates net of
fixed costs (actor start-up, model loading) come from the runs over N and 10×N: (10×N − N) images
over the extra seconds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"
SOURCE_IMAGES = SHARED / "data" / "isic2017_fullres" / "images"
#: Real images that calibrate openvino-int8: ISIC 2017 training images, none of them measured here.
CALIBRATION_IMAGES = SHARED / "data" / "isic2017" / "ISIC-2017_Training_Data"
CLASS_NAMES = ("melanoma", "seborrheic_keratosis", "nevus")
HAM10000_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
MIB = 1024 * 1024
TARGET_MEMORY_RATIO = 1.2
TARGET_VS_PARTS = 0.8
TARGET_VS_PLAIN = 1.5
# Ray's own processes that are not workers running our tasks or actors.
SYSTEM_PROCESS_TITLES = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def image_pixels(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return image.size[0] * image.size[1]


def pick_images(sources: list[Path], n: int) -> list[Path]:
    """``n`` images spread evenly over the sources ranked by pixel count (cycled if n exceeds them)."""
    ranked = sorted(sources, key=lambda p: (image_pixels(p), p.name))
    if n >= len(ranked):
        return [ranked[i % len(ranked)] for i in range(n)]
    picks = np.round(np.linspace(0, len(ranked) - 1, n)).astype(int)
    return [ranked[i] for i in picks]


def link_images(images: list[Path], folder: Path, repeat: int) -> Path:
    """``folder`` holding ``repeat`` × ``images`` as symlinks with distinct names."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for copy in range(repeat):
        for index, source in enumerate(images):
            (folder / f"r{copy:02d}_{index:04d}_{source.name}").symlink_to(source)
    return folder


def describe_images(images: list[Path]) -> dict:
    pixels = np.array([image_pixels(p) for p in images], dtype=float) / 1e6
    sizes = np.array([p.stat().st_size for p in images], dtype=float) / MIB
    return {
        "count": len(images),
        "megapixels_min": round(float(pixels.min()), 3),
        "megapixels_mean": round(float(pixels.mean()), 3),
        "megapixels_max": round(float(pixels.max()), 3),
        "jpeg_mib_mean": round(float(sizes.mean()), 3),
        "jpeg_mib_total": round(float(sizes.sum()), 2),
    }


def save_models(folder: Path, kind: str = "released") -> dict[str, str]:
    """The models every measurement runs. ``released``: the shipped segmenter, and the shipped
    classifier or, until one is released, a freshly initialised ROI classifier of the recipes'
    kind (EfficientNet-Lite0, 176×176, HAM10000's 7 classes). ``random``: the earlier figures'
    U-Net (ResNet-34, 256×256) and ROI classifier (ResNet-18, 224×224, 3 classes), both random.
    Random weights cost the same time as trained ones, but a random segmenter finds no lesion, so
    its ROI classifier idles, and reduced-precision backends fail the guard on its logits near 0."""
    import torch

    from skinray.models import create_model, save_model
    from skinray.models.zoo import (
        DEFAULT_CLASSIFIER,
        DEFAULT_SEGMENTER,
        released_models,
        resolve_model,
    )

    torch.manual_seed(0)
    if kind == "released":
        models = {"segmenter": resolve_model(DEFAULT_SEGMENTER)}
        if DEFAULT_CLASSIFIER in released_models():
            return {**models, "classifier": resolve_model(DEFAULT_CLASSIFIER)}
        classifier = folder / "classifier_lite0_roi"
        save_model(
            create_model("classifier", encoder="tf_efficientnet_lite0", num_classes=7),
            str(classifier),
            input_size=(176, 176),
            class_names=HAM10000_CLASSES,
            roi_source_size=(150, 200),
        )
        return {**models, "classifier": str(classifier)}
    segmenter, classifier = folder / "unet_resnet34", folder / "classifier_resnet18"
    save_model(create_model("unet", encoder="resnet34"), str(segmenter), input_size=(256, 256))
    save_model(
        create_model("classifier", encoder="resnet18", num_classes=len(CLASS_NAMES)),
        str(classifier),
        input_size=(224, 224),
        class_names=CLASS_NAMES,
    )
    return {"segmenter": str(segmenter), "classifier": str(classifier)}


def prepare_inputs(workdir: Path, n: int, models: str = "released") -> dict:
    sources = sorted(SOURCE_IMAGES.glob("*.jpg"))
    if not sources:
        raise SystemExit(f"no JPEGs in {SOURCE_IMAGES}")
    for path in sources:  # the files in the page cache, so no run pays for a cold disk read
        path.read_bytes()
    images = pick_images(sources, n)
    small = link_images(images, workdir / f"images_{n}", repeat=1)
    large = link_images(images, workdir / f"images_{10 * n}", repeat=10)
    return {
        "source": str(SOURCE_IMAGES),
        "small": str(small),
        "large": str(large),
        "distinct_images": describe_images(images),
        "all_source_images": describe_images(sources),
        "models": save_models(workdir / "models", models),
    }


# ---------------------------------------------------------------------------------------------
# Memory sampling
# ---------------------------------------------------------------------------------------------


def load_psutil():
    """psutil as Ray bundles it: ``import ray`` puts ray/thirdparty_files on sys.path."""
    import ray  # noqa: F401

    return importlib.import_module("psutil")


def is_worker(cmdline: list[str]) -> bool:
    """A Ray worker process (idle, task or actor), as opposed to a Ray system process."""
    title = cmdline[0] if cmdline else ""
    if title.startswith("ray::"):
        return not title.startswith(SYSTEM_PROCESS_TITLES)
    return any("default_worker.py" in part for part in cmdline)


class MemorySampler(threading.Thread):
    """Peaks of driver RSS, summed worker RSS, summed system RSS and object-store bytes in use."""

    def __init__(self, interval_s: float) -> None:
        super().__init__(daemon=True)
        import ray
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import node_manager_pb2_grpc

        node = next(n for n in ray.nodes() if n["Alive"])
        channel = init_grpc_channel(f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}")
        self.stub = node_manager_pb2_grpc.NodeManagerServiceStub(channel)
        self.store_capacity = int(ray.cluster_resources()["object_store_memory"])
        self.interval_s = interval_s
        self.driver = load_psutil().Process()
        self.done = threading.Event()
        self.samples: list[dict] = []
        self.store_stats_error: str | None = None
        self.spilled_bytes = 0

    def object_store(self) -> dict:
        import ray
        from ray.core.generated import node_manager_pb2

        available = ray.available_resources().get("object_store_memory", self.store_capacity)
        out = {"resources_used": self.store_capacity - int(available), "store_used": None}
        try:
            reply = self.stub.GetNodeStats(
                node_manager_pb2.GetNodeStatsRequest(include_memory_info=False), timeout=5
            )
        except Exception as error:  # a slow raylet: keep the other figures of this sample
            self.store_stats_error = f"{type(error).__name__}: {error}"
            return out
        out["store_used"] = int(reply.store_stats.object_store_bytes_used)
        self.spilled_bytes = int(reply.store_stats.spilled_bytes_total)
        return out

    def sample(self) -> dict:
        psutil = load_psutil()
        workers = {"rss": 0, "anon": 0, "count": 0}
        system = {"rss": 0, "count": 0}
        for process in self.driver.children(recursive=True):
            try:
                cmdline = process.cmdline()
                memory = process.memory_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if is_worker(cmdline):
                workers["rss"] += memory.rss
                workers["anon"] += memory.rss - memory.shared
                workers["count"] += 1
            else:
                system["rss"] += memory.rss
                system["count"] += 1
        return {
            "t": time.perf_counter(),
            "driver_rss": self.driver.memory_info().rss,
            "workers_rss": workers["rss"],
            "workers_anon_rss": workers["anon"],
            "workers": workers["count"],
            "system_rss": system["rss"],
            "system_processes": system["count"],
            **self.object_store(),
        }

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append(self.sample())
            self.done.wait(self.interval_s)

    def stop(self) -> dict:
        self.done.set()
        self.join()
        return self.summary()

    def summary(self) -> dict:
        def peak(key: str) -> float | None:
            values = [s[key] for s in self.samples if s[key] is not None]
            return round(max(values) / MIB, 1) if values else None

        start = self.samples[0]["t"] if self.samples else 0.0
        return {
            "samples": len(self.samples),
            "peak_driver_rss_mib": peak("driver_rss"),
            "peak_workers_rss_mib": peak("workers_rss"),
            "peak_workers_anon_rss_mib": peak("workers_anon_rss"),
            "peak_worker_processes": max((s["workers"] for s in self.samples), default=0),
            "peak_system_rss_mib": peak("system_rss"),
            "peak_object_store_used_mib": peak("store_used"),
            "peak_object_store_resources_used_mib": peak("resources_used"),
            "object_store_capacity_mib": round(self.store_capacity / MIB, 1),
            "spilled_mib": round(self.spilled_bytes / MIB, 1),
            "store_stats_error": self.store_stats_error,
            # One sample a second, for plots: seconds, then MiB.
            "timeline": [
                [
                    round(s["t"] - start, 2),
                    round(s["driver_rss"] / MIB),
                    round(s["workers_rss"] / MIB),
                    None if s["store_used"] is None else round(s["store_used"] / MIB),
                ]
                for s in self.samples[:: max(1, round(1 / self.interval_s))]
            ],
        }


# ---------------------------------------------------------------------------------------------
# Sessions (each runs in its own process: python bench/score_pipeline.py --session …)
# ---------------------------------------------------------------------------------------------


def start_ray(cpus: int) -> None:
    """A local Ray of ``cpus`` CPUs, its node set up as ``run_scoring`` sets up the local Ray it
    starts (and cluster.yaml its worker nodes)."""
    import ray

    from skinray.score.plan import ray_node_environment

    os.environ.update(ray_node_environment(cpus))
    ray.init(num_cpus=cpus, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


def score_config(images: str, output: Path, models: dict, run_id: str):
    from skinray.score.config import make_score_config

    if output.exists():
        shutil.rmtree(output)
    return make_score_config(
        input=images,
        output=str(output),
        segmenter=models["segmenter"],
        classifier=models["classifier"],
        run_id=run_id,
        int8_calibration=str(CALIBRATION_IMAGES),
    )


def run_pipeline(config) -> dict:
    from skinray.score.pipeline import run_scoring

    started = time.perf_counter()
    summary = run_scoring(config)
    wall_s = time.perf_counter() - started
    return {
        "images": summary.inputs_listed,
        "results": summary.results,
        "errors": summary.errors,
        "errors_by_type": summary.errors_by_type,
        "summary_wall_s": round(summary.wall_time_s, 2),
        "summary_images_per_s": round(summary.images_per_s, 3),
        "timed_wall_s": round(wall_s, 2),
        "timed_images_per_s": round(summary.inputs_listed / wall_s, 3),
        "object_store_budget_mib": summary.object_store_budget_mib,
        "stages": [asdict(stage) for stage in summary.stages],
        "stage_lines": [stage.line() for stage in summary.stages],
    }


def memory_session(args: argparse.Namespace) -> dict:
    import ray

    models = json.loads(args.models)
    config = score_config(args.images, Path(args.output), models, Path(args.images).name)
    start_ray(args.cpus)
    try:
        sampler = MemorySampler(args.sample_interval)
        sampler.start()
        try:
            pipeline = run_pipeline(config)
        finally:
            memory = sampler.stop()
    finally:
        ray.shutdown()
    return {"pipeline": pipeline, "memory": memory}


def actor_threads(num_cpus: float) -> dict:
    """torch's intra-op threads and OMP_NUM_THREADS inside a Ray Data actor of ``num_cpus``."""
    import ray

    class Probe:
        def __call__(self, batch: dict) -> dict:
            import torch

            return {
                "torch_threads": np.array([torch.get_num_threads()]),
                "omp_num_threads": np.array([os.environ.get("OMP_NUM_THREADS", "")]),
            }

    row = (
        ray.data.range(1)
        .map_batches(Probe, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=num_cpus)
        .take(1)[0]
    )
    return {"torch_threads": int(row["torch_threads"]), "omp_num_threads": row["omp_num_threads"]}


def decode_only(images: str, config, segment_size: tuple[int, int]) -> dict:
    """(a) The pipeline's listing and read/decode stage, as it builds them, consumed in the driver."""
    from skinray import io
    from skinray.score.graph import decoded_images
    from skinray.score.sources import stage_listing

    started = time.perf_counter()
    staging = io.join(config.output, "_staging", "decode-only")
    config = config.model_copy(update={"input": images})  # a warm-up set, or the N set
    listing = stage_listing(config, staging, {}, config.decode_batch_size, use_gpu=False)
    dataset = decoded_images(listing, config, segment_size)
    count = errors = 0
    for batch in dataset.iter_batches(batch_size=None):
        count += len(batch["source_uri"])
        errors += sum(stage != "" for stage in batch["error_stage"])
    wall_s = time.perf_counter() - started
    return {
        "images": count,
        "errors": errors,
        "wall_s": round(wall_s, 2),
        "images_per_s": count / wall_s,
    }


def rows(batch: dict, start: int, stop: int) -> dict:
    return {key: np.array(value[start:stop], copy=True) for key, value in batch.items()}


def time_stage(stage, batch: dict, batch_size: int) -> tuple[float, list[dict]]:
    """Seconds ``stage`` takes over ``batch`` in chunks of ``batch_size``, and its outputs."""
    seconds, outputs = 0.0, []
    for start in range(0, len(batch["source_uri"]), batch_size):
        chunk = rows(batch, start, start + batch_size)
        started = time.perf_counter()
        outputs.append(stage(chunk))
        seconds += time.perf_counter() - started
    return seconds, outputs


@functools.cache
def _calibration_images(uri: str, input_size: tuple[int, int]):
    from skinray.backends import read_calibration_images

    return read_calibration_images(uri, input_size)


def calibration_images(config, input_size):
    """int8's calibration images, read once, as ``run_scoring`` reads them for a run."""
    if not config.int8_calibration:
        return None
    return _calibration_images(config.int8_calibration, tuple(input_size))


def model_only(images: str, config, input_size, threads: int, backend: str = "eager") -> dict:
    """(b) The pipeline's PredictActor code (segmenter → ROI → classifier, one ``Predictor``) in
    the driver, on pre-decoded images, with the networks on ``backend``; for a backend other than
    eager, also its accuracy guard against eager's outputs on the same images."""
    import torch

    from skinray.score.actors import PredictActor
    from skinray.score.sources import list_inputs
    from skinray.score.stages import read_and_decode

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        listing = list_inputs(images).to_pydict()
        decoded = read_and_decode(listing, input_size, config.max_pixels)
        predict = PredictActor(
            config.segmenter,
            config.classifier,
            config.batch_size,
            cpu_threads=threads,
            backend=backend,
            calibration_images=calibration_images(config, input_size),
        )
        # Each pass runs twice, timing the second: oneDNN builds its kernels per batch shape (and
        # torch.compile compiles, ONNX Runtime plans, on the first calls).
        time_stage(predict, decoded, config.batch_size)
        predict_s, outputs = time_stage(predict, decoded, config.batch_size)
        guard = None
        if predict.backend != "eager":
            eager = PredictActor(
                config.segmenter, config.classifier, config.batch_size, backend="eager"
            )
            _, reference = time_stage(eager, decoded, config.batch_size)
            guard = accuracy_guard(reference, outputs, predict.backend)
    finally:
        torch.set_num_threads(previous)
    count = len(listing["source_uri"])
    return {
        "images": count,
        "torch_threads": threads,
        "backend_asked": backend,
        "backend": predict.backend,
        "fallback_reason": predict.fallback_reason,
        "guard": guard,
        "predict_s": round(predict_s, 2),
        "images_per_s": count / predict_s,
    }


def one_thread_actor(config, backend: str, calibration):
    """The pipeline's model stage on one thread, as (e) and (f) run it."""
    from skinray.score.actors import PredictActor

    return PredictActor(
        config.segmenter,
        config.classifier,
        config.batch_size,
        cpu_threads=1,
        backend=backend,
        calibration_images=calibration,
    )


def finished_rows(outputs: list[dict], config, models) -> list[dict]:
    """The describe and row stages over the model stage's outputs."""
    from skinray.score.stages import describe_lesions, finish_rows

    return [
        finish_rows(
            describe_lesions(output),
            class_names=models.class_names,
            models=models.identity,
            run_id="bench",
            include_cam=config.include_cam,
        )
        for output in outputs
    ]


def single_core_costs(images: str, config, backend: str) -> dict:
    """(e) Each stage's cost on one core, in the driver, without Ray: ``read_and_decode`` (OpenCV
    on one thread), the models on one thread on ``backend``, and the describe and row stages; and
    the rate the machine's cores would reach doing that work and nothing else. No pipeline on
    those cores can beat that floor."""
    import cv2
    import torch

    from skinray.score.plan import read_scoring_models
    from skinray.score.sources import list_inputs
    from skinray.score.stages import read_and_decode

    models = read_scoring_models(config)
    previous = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    try:
        listing = list_inputs(images).to_pydict()
        read_and_decode(listing, models.input_size, config.max_pixels)  # the files into page cache
        started = time.perf_counter()
        decoded = read_and_decode(listing, models.input_size, config.max_pixels)
        decode_s = time.perf_counter() - started
        predict = one_thread_actor(config, backend, calibration_images(config, models.input_size))
        time_stage(predict, decoded, config.batch_size)  # the guard's eager run, kernels built
        models_s, outputs = time_stage(predict, decoded, config.batch_size)
        started = time.perf_counter()
        finished_rows(outputs, config, models)
        describe_s = time.perf_counter() - started
    finally:
        cv2.setNumThreads(previous[0])
        torch.set_num_threads(previous[1])
    count, cores = len(listing["source_uri"]), os.cpu_count() or 1
    per_image_ms = {
        "decode": 1000 * decode_s / count,
        "models": 1000 * models_s / count,
        "describe_and_rows": 1000 * describe_s / count,
    }
    return {
        "images": count,
        "backend": predict.backend,
        "per_image_core_ms": {k: round(v, 3) for k, v in per_image_ms.items()},
        "cores": cores,
        "floor_images_per_s": round(cores * 1000 / sum(per_image_ms.values()), 2),
    }


def accuracy_guard(reference: list[dict], candidate: list[dict], backend: str) -> dict:
    """``skinray.backends.compare_predictions`` on the rows of two model stages over the same
    images: mean per-image mask Jaccard, the largest class-probability difference and the share of
    predicted classes that agree, against eager; ``passed``: ``backend``'s own guard."""
    from skinray.backends import compare_predictions

    result = compare_predictions(_as_prediction(reference), _as_prediction(candidate))
    classifies = "class_probabilities" in reference[0]
    return {
        "mask_jaccard": round(result.mask_jaccard, 5),
        "max_probability_difference": round(result.max_probability_difference, 6),
        "class_agreement": round(result.class_agreement, 4) if classifies else None,
        "passed": result.passed_for(backend),
    }


def _as_prediction(outputs: list[dict]):
    """The model stage's output batches as one ``Prediction`` (masks and class probabilities)."""
    import torch

    from skinray.predict import Prediction

    def joined(key):
        if key not in outputs[0]:
            return None
        return torch.from_numpy(np.concatenate([output[key] for output in outputs]))

    return Prediction(None, joined("mask"), joined("class_probabilities"), None, None)


class PlainPredictor:
    """Ray's batch-inference pattern: the segmenter, then the classifier on the resized image."""

    def __init__(self, segmenter: str, classifier: str) -> None:
        import torch

        from skinray.models import load_model

        # The same torch threads as (b) and the pipeline's CPU actors (Ray would set 1 from the
        # actor's num_cpus=1), so that (c)/(d) compares the pipelines, not thread settings.
        torch.set_num_threads(os.cpu_count() or 1)
        self.segmenter = load_model(segmenter)
        self.classifier = load_model(classifier)

    def __call__(self, batch: dict) -> dict:
        import torch
        import torch.nn.functional as F

        from skinray.data.transforms import normalise
        from skinray.models import CLASS_LOGITS, MASK_LOGITS

        seg, cls = self.segmenter.saved_config, self.classifier.saved_config
        images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2)
        with torch.inference_mode():
            mask_logits = self.segmenter(normalise(images, seg.mean, seg.std))[MASK_LOGITS]
            resized = F.interpolate(
                images.float(), size=tuple(cls.input_size), mode="bilinear", antialias=True
            )
            logits = self.classifier(normalise(resized, cls.mean, cls.std))[CLASS_LOGITS]
        return {
            "mask": (mask_logits[:, 0] > 0).to(torch.uint8).numpy(),
            "probabilities": torch.softmax(logits, 1).numpy(),
        }


def plain_pattern(images: str, config, segment_size) -> dict:
    """(d) read_images + map_batches(callable class), one CPU actor (the docs' default num_cpus=1),
    consumed by iteration (``count()`` may skip a UDF that keeps the row count)."""
    import ray

    started = time.perf_counter()
    dataset = ray.data.read_images(images, size=tuple(segment_size), mode="RGB").map_batches(
        PlainPredictor,
        fn_constructor_kwargs={
            "segmenter": config.segmenter,
            "classifier": config.classifier,
        },
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=config.batch_size,
    )
    count = sum(len(batch["mask"]) for batch in dataset.iter_batches(batch_size=None))
    wall_s = time.perf_counter() - started
    return {"images": count, "wall_s": round(wall_s, 2), "images_per_s": count / wall_s}


def throughput_session(args: argparse.Namespace) -> dict:
    import ray

    from skinray.backends import BACKENDS
    from skinray.models import read_model_config
    from skinray.score.plan import read_scoring_models

    models = json.loads(args.models)
    config = score_config(args.images, Path(args.output), models, "throughput")
    # (a) and (b) take what the pipeline decodes to: for a pair, the classifier's size (150×200
    # for the shipped one); (d) reads at the segmenter's, as a user of Ray's pattern would.
    segment_size = tuple(read_scoring_models(config).input_size)
    plain_size = tuple(read_model_config(config.segmenter).input_size)
    start_ray(args.cpus)
    try:
        threads = {"half_cpu_actor": actor_threads(0.5), "one_cpu_actor": actor_threads(1)}
        # Warm-up: Ray Data's first job starts the task workers and imports skinray in them.
        warm = Path(args.output).parent / "warmup_images"
        if warm.exists():
            shutil.rmtree(warm)
        warm.mkdir(parents=True)
        for path in sorted(Path(args.images).iterdir())[: config.decode_batch_size]:
            (warm / path.name).symlink_to(path.resolve())
        decode_only(str(warm), config, segment_size)
        cpus = os.cpu_count() or 1
        backends = {
            name: model_only(args.images, config, segment_size, cpus, name) for name in BACKENDS
        }
        best = max(
            (r for r in backends.values() if r["backend"] == "eager" or r["guard"]["passed"]),
            key=lambda r: r["images_per_s"],
        )["backend"]
        out = {
            "actor_threads": threads,
            "decode_only": decode_only(args.images, config, segment_size),
            "model_only_backends": backends,
            "best_backend": best,
            "model_only": backends[best],
            "single_core": single_core_costs(args.images, config, best),
            "whole_path_processes": whole_path_processes(args.images, config, best),
            "pipeline": run_pipeline(config.model_copy(update={"backend": best})),
            "plain": plain_pattern(args.images, config, plain_size),
        }
        if args.more_images:  # (d) over 10×N too, for its rate net of fixed costs
            out["plain_10n"] = plain_pattern(args.more_images, config, plain_size)
    finally:
        ray.shutdown()
    return out


SESSIONS = {"memory": memory_session, "throughput": throughput_session}


def run_session(
    kind: str, images: str, output: Path, models: dict, args, more_images: str | None = None
) -> dict:
    """A session in a fresh Python process (fresh driver memory, fresh ``ray.init``)."""
    result = output.with_suffix(".session.json")
    command = [
        sys.executable,
        __file__,
        "--session",
        kind,
        "--images",
        images,
        "--output",
        str(output),
        "--models",
        json.dumps(models),
        "--result",
        str(result),
        "--cpus",
        str(args.cpus),
        "--sample-interval",
        str(args.sample_interval),
        *(["--more-images", more_images] if more_images else []),
    ]
    print(f"… {kind} session over {images}", flush=True)
    subprocess.run(command, check=True)
    return json.loads(result.read_text())


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def machine() -> dict:
    import ray
    import torch

    psutil = load_psutil()

    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "nproc": int(subprocess.run(["nproc"], capture_output=True, text=True).stdout),
        "ram_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "torch_threads_driver": torch.get_num_threads(),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def whole_path_processes(images: str, config, backend: str) -> dict:
    """(f) The floor of (e) measured, not summed: one process a core, no Ray, each running
    the whole path (``read_and_decode`` → ``PredictActor`` on one thread → describe and rows) over
    every ``cores``-th image, ``decode_batch_size`` at a time, timed after a warm-up (its
    start-up, the guard's eager run and the kernels' first build excluded) from a common start."""
    import multiprocessing

    from skinray.score.plan import read_scoring_models
    from skinray.score.sources import list_inputs

    models = read_scoring_models(config)
    listing = list_inputs(images).to_pydict()
    cores = os.cpu_count() or 1
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    start, results = context.Barrier(cores), context.Queue()
    shares = [{key: values[k::cores] for key, values in listing.items()} for k in range(cores)]
    calibration = calibration_images(config, models.input_size)
    workers = [
        context.Process(
            target=_whole_path,
            args=(share, config, models, backend, calibration, start, results),
        )
        for share in shares
    ]
    for worker in workers:
        worker.start()
    seconds = [results.get(timeout=900) for _ in workers]
    for worker in workers:
        worker.join()
    count = len(listing["source_uri"])
    return {
        "images": count,
        "processes": cores,
        "seconds_per_process": [round(s, 3) for s in seconds],
        "images_per_s": round(count / max(seconds), 2),
    }


def _whole_path(share, config, models, backend, calibration, start, results) -> None:
    import cv2
    import torch

    from skinray.score.stages import read_and_decode

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    predict = one_thread_actor(config, backend, calibration)

    def score(listing: dict) -> None:
        decoded = read_and_decode(listing, models.input_size, config.max_pixels)
        finished_rows(time_stage(predict, decoded, config.batch_size)[1], config, models)

    score({key: values[: config.batch_size] for key, values in share.items()})  # warm-up
    start.wait()
    started = time.perf_counter()
    step = config.decode_batch_size
    for first in range(0, len(share["source_uri"]), step):
        score({key: values[first : first + step] for key, values in share.items()})
    results.put(time.perf_counter() - started)


def memory_ratios(small: dict, large: dict) -> dict:
    keys = [k for k in small if k.startswith("peak_") and k.endswith("_mib")]
    return {k: ratio(large[k], small[k]) for k in keys}


def throughput_ratios(t: dict) -> dict:
    parts = min(t["decode_only"]["images_per_s"], t["model_only"]["images_per_s"])
    pipeline = t["pipeline"]["timed_images_per_s"]
    vs_parts, vs_plain = pipeline / parts, pipeline / t["plain"]["images_per_s"]
    floor = t.get("single_core", {}).get("floor_images_per_s")
    measured = t.get("whole_path_processes", {}).get("images_per_s")
    return {
        "floor_images_per_s": floor,
        "measured_floor_images_per_s": measured,
        "target_vs_parts_over_measured_floor": ratio(TARGET_VS_PARTS * parts, measured),
        "pipeline_over_floor": ratio(pipeline, floor),
        # Above 1: the 0.8 target asks for more than the cores can do with no overhead at all.
        "target_vs_parts_over_floor": ratio(TARGET_VS_PARTS * parts, floor),
        "pipeline_over_min_decode_model": round(vs_parts, 3),
        "pipeline_over_plain": round(vs_plain, 3),
        "target_pipeline_over_min_decode_model": TARGET_VS_PARTS,
        "target_pipeline_over_plain": TARGET_VS_PLAIN,
        "met_pipeline_over_min_decode_model": vs_parts >= TARGET_VS_PARTS,
        "met_pipeline_over_plain": vs_plain >= TARGET_VS_PLAIN,
    }


def marginal(small: tuple[int, float], large: tuple[int, float]) -> dict:
    """A rate net of fixed costs (actor start-up, model loading, listing, the final split): extra
    images over extra seconds between a run over N and one over 10×N."""
    extra, extra_s = large[0] - small[0], large[1] - small[1]
    rate = extra / extra_s if extra_s > 0 else None
    return {
        "extra_images": extra,
        "extra_s": round(extra_s, 2),
        "images_per_s": round(rate, 3) if rate else None,
        "fixed_cost_s": round(small[1] - small[0] / rate, 2) if rate else None,
    }


def marginal_rates(small: dict, large: dict, throughput: dict) -> dict:
    """(c) from the two memory runs; (d) from its runs over N and 10×N."""
    out = {
        "pipeline": marginal(
            (small["images"], small["timed_wall_s"]), (large["images"], large["timed_wall_s"])
        )
    }
    if "plain_10n" in throughput:
        plain, plain_10n = throughput["plain"], throughput["plain_10n"]
        out["plain"] = marginal(
            (plain["images"], plain["wall_s"]), (plain_10n["images"], plain_10n["wall_s"])
        )
        out["pipeline_over_plain"] = ratio(
            out["pipeline"]["images_per_s"], out["plain"]["images_per_s"]
        )
    return out


def print_report(results: dict) -> None:
    n, memory = results["settings"]["n"], results["memory"]
    if memory is None:
        print_throughput(results, n)
        return
    small, large = memory["n"]["memory"], memory["10n"]["memory"]
    print(f"\nMemory (peaks, MiB) — {n} vs {10 * n} images")
    print(f"{'':34}{n:>10}{10 * n:>10}{'ratio':>9}")
    labels = {
        "peak_driver_rss_mib": "driver RSS",
        "peak_workers_rss_mib": "Ray workers, summed RSS",
        "peak_workers_anon_rss_mib": "Ray workers, summed anon RSS",
        "peak_system_rss_mib": "Ray system processes, summed RSS",
        "peak_object_store_used_mib": "object store in use",
        "peak_object_store_resources_used_mib": "object_store_memory resource used",
    }
    for key, label in labels.items():
        r = memory["ratios"][key]
        print(f"{label:34}{small[key]!s:>10}{large[key]!s:>10}{r!s:>9}")
    print(f"(target ratio ≤ {TARGET_MEMORY_RATIO}; {small['samples']}/{large['samples']} samples)")
    for key in [k for k in memory if k.startswith("ratios_")]:
        times = key.removeprefix("ratios_")
        extra = memory[times]["memory"]
        print(f"over {times.removesuffix('n')}×N = {memory[times]['pipeline']['images']} images:")
        for peak, label in labels.items():
            print(f"{label:34}{small[peak]!s:>10}{extra[peak]!s:>10}{memory[key][peak]!s:>9}")
    for name, run in (("N", memory["n"]), ("10N", memory["10n"])):
        p = run["pipeline"]
        print(
            f"pipeline {name}: {p['images']} images, {p['results']} results, {p['errors']} errors, "
            f"{p['timed_wall_s']} s, {p['timed_images_per_s']:.2f} images/s"
        )
    for name in [
        k for k in memory if k.endswith("n") and k not in ("n", "10n") and "pipeline" in memory[k]
    ]:
        p = memory[name]["pipeline"]
        print(
            f"pipeline {name.upper()}: {p['images']} images, {p['results']} results, "
            f"{p['timed_wall_s']} s, {p['timed_images_per_s']:.2f} images/s"
        )
    if results["throughput"] is None:
        m = results["marginal"]["pipeline"]
        print(f"(c) net of fixed costs: {m['images_per_s']} images/s")
        return
    print_throughput(results, n)


def print_throughput(results: dict, n: int) -> None:
    t = results["throughput"]
    print(f"\nThroughput on {n} images (images/s)")
    rows_ = [
        ("(a) decode only (read_and_decode)", t["decode_only"]["images_per_s"]),
        *(
            (
                f"(b) models only, {name} ({r['backend']}), {r['torch_threads']} threads",
                r["images_per_s"],
            )
            for name, r in t["model_only_backends"].items()
        ),
        (
            f"    models only, {t['best_backend']}, 1 thread ((e))",
            1000 / t["single_core"]["per_image_core_ms"]["models"],
        ),
        ("(c) full pipeline (own timing)", t["pipeline"]["timed_images_per_s"]),
        ("    full pipeline (run summary)", t["pipeline"]["summary_images_per_s"]),
        ("(d) read_images + map_batches", t["plain"]["images_per_s"]),
    ]
    for label, value in rows_:
        print(f"{label:52}{value:>8.2f}")
    for name, r in t["model_only_backends"].items():
        if r["guard"] or r["fallback_reason"]:
            print(f"    {name}: guard {r['guard']}; fallback {r['fallback_reason']}")
    print(f"    best backend (fastest passing the guard): {t['best_backend']}")
    if "plain_10n" in t:
        print(f"{'    read_images + map_batches, 10×N':44}{t['plain_10n']['images_per_s']:>8.2f}")
    m = results.get("marginal", {})
    print("Net of fixed costs ((10×N − N) images / extra seconds):")
    for key, label in (("pipeline", "(c) full pipeline (memory runs)"), ("plain", "(d) plain")):
        if key in m:
            print(
                f"    {label:40}{m[key]['images_per_s']!s:>8}"
                f"  (fixed cost ≈ {m[key]['fixed_cost_s']} s a run)"
            )
    if "pipeline_over_plain" in m:
        print(f"    (c)/(d) net of fixed costs = {m['pipeline_over_plain']}")
    r = results["throughput_ratios"]
    if r.get("floor_images_per_s"):
        costs = t["single_core"]["per_image_core_ms"]
        print(
            f"(e) one core an image: decode {costs['decode']} ms, models {costs['models']} ms, "
            f"describe and rows {costs['describe_and_rows']} ms → floor on "
            f"{t['single_core']['cores']} cores {r['floor_images_per_s']} images/s; "
            f"(c)/floor = {r['pipeline_over_floor']}; "
            f"{TARGET_VS_PARTS} × min(a,b) / floor = {r['target_vs_parts_over_floor']}"
        )
    if r.get("measured_floor_images_per_s"):
        f = t["whole_path_processes"]
        print(
            f"(f) the whole path in {f['processes']} processes, no Ray, start-up excluded: "
            f"{r['measured_floor_images_per_s']} images/s (seconds per process "
            f"{f['seconds_per_process']}); {TARGET_VS_PARTS} × min(a,b) / (f) = "
            f"{r['target_vs_parts_over_measured_floor']}"
        )
    print(
        f"(c)/min(a,b) = {r['pipeline_over_min_decode_model']:.2f} (target ≥ {TARGET_VS_PARTS}: "
        f"{'met' if r['met_pipeline_over_min_decode_model'] else 'not met'}); "
        f"(c)/(d) = {r['pipeline_over_plain']:.2f} (target ≥ {TARGET_VS_PLAIN}: "
        f"{'met' if r['met_pipeline_over_plain'] else 'not met'})"
    )


def main_benchmark(args: argparse.Namespace) -> None:
    from skinray.score.config import ScoreConfig

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = dt.datetime.now(dt.UTC)
    inputs = prepare_inputs(workdir, args.n, args.model_set)
    models = inputs["models"]
    small = large = None
    if not args.throughput_only:
        small = run_session("memory", inputs["small"], workdir / "out_memory_n", models, args)
        large = run_session("memory", inputs["large"], workdir / "out_memory_10n", models, args)
    throughput = None
    if not args.memory_only:
        throughput = run_session(
            "throughput",
            inputs["small"],
            workdir / "out_throughput",
            models,
            args,
            None if args.skip_plain_10n else inputs["large"],
        )
    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {
            "n": args.n,
            "ray_init_num_cpus": args.cpus,
            "sample_interval_s": args.sample_interval,
            # ScoreConfig's defaults, which every run here uses.
            "batch_size": ScoreConfig.model_fields["batch_size"].default,
            "decode_batch_size": ScoreConfig.model_fields["decode_batch_size"].default,
            "model_set": args.model_set,  # save_models says what each set is
            "worker_processes": "ray:: workers and actors (Ray Data's own actors included); "
            "system = GCS, raylet, dashboard and its modules, log monitor, agents",
            "object_store_used": "raylet GetNodeStats store_stats.object_store_bytes_used",
        },
        "inputs": inputs,
        "memory": {"n": small, "10n": large} if small else None,
        "throughput": throughput,
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
    }
    if small is None:
        results["throughput_ratios"] = throughput_ratios(throughput)
        finish(results, args)
        return
    results["memory"]["ratios"] = memory_ratios(small["memory"], large["memory"])
    if args.also_times:  # a further run over M×N images, to show where the peaks level off
        images = pick_images(sorted(SOURCE_IMAGES.glob("*.jpg")), args.n)
        folder = link_images(
            images, workdir / f"images_{args.also_times * args.n}", args.also_times
        )
        extra = run_session("memory", str(folder), workdir / "out_memory_mn", models, args)
        results["memory"][f"{args.also_times}n"] = extra
        results["memory"][f"ratios_{args.also_times}n"] = memory_ratios(
            small["memory"], extra["memory"]
        )
    results["memory"]["target_ratio"] = TARGET_MEMORY_RATIO
    if throughput is not None:
        results["throughput_ratios"] = throughput_ratios(throughput)
    results["marginal"] = marginal_rates(small["pipeline"], large["pipeline"], throughput or {})
    finish(results, args)


def finish(results: dict, args: argparse.Namespace) -> None:
    print_report(results)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {args.json}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--n", type=int, default=440, help="images in the small set (10× in the large)"
    )
    parser.add_argument("--workdir", default="/work/runs/bench_score")
    parser.add_argument(
        "--model-set",
        choices=("released", "random"),
        default="released",
        help="the shipped models (default) or the earlier figures' random ResNet pair",
    )
    parser.add_argument("--json", default=None, help="default: <workdir>/results.json")
    parser.add_argument("--cpus", type=int, default=2, help="ray.init(num_cpus=…)")
    parser.add_argument("--sample-interval", type=float, default=0.25, help="seconds")
    parser.add_argument(
        "--also-times", type=int, default=0, help="also a memory run over this many times N"
    )
    parser.add_argument("--memory-only", action="store_true", help="skip the throughput session")
    parser.add_argument(
        "--throughput-only", action="store_true", help="skip the memory sessions (N and 10×N)"
    )
    parser.add_argument(
        "--skip-plain-10n", action="store_true", help="run the docs pattern over N only, not 10×N"
    )
    # One measurement in a fresh process; the benchmark runs itself with these.
    for name in ("--session", "--images", "--more-images", "--output", "--models", "--result"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.json = args.json or str(Path(args.workdir) / "results.json")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.session:
        Path(args.result).write_text(json.dumps(SESSIONS[args.session](args), default=str))
    else:
        main_benchmark(args)


if __name__ == "__main__":
    main()
