"""GPU scoring benchmark (issue #13): models, decoding and the pipeline on one GPU.

    python bench/score_gpu.py [--n 440] [--images DIR] [--batch-sizes 16 64 128] \\
        [--backends eager eager-bf16 eager-mixed compile] [--device cuda|cpu] [--skip-pipeline] \\
        [--out FILE]

Inputs are those of ``bench/score_pipeline.py`` (its functions are reused, not copied): N real
full-resolution ISIC JPEGs picked evenly over the source folder's pixel counts (at N = 440 every one
of the 110 images four times), symlinked under ``--workdir``, and the same models
(``--model-set``, score_pipeline's ``save_models``: by default the shipped segmenter and
classifier; ``random`` for the earlier figures' U-Net ResNet-34 → ROI → ResNet-18). The JSON's
settings name each model with its weights' SHA-256. It measures:

1. Models alone, images/s: the pipeline's ``PredictActor`` in the driver on pre-decoded images (as
   score_pipeline's ``model_only``), each backend (``eager``: f32; ``eager-bf16``: bf16 autocast;
   ``eager-mixed``: bf16 autocast for the networks without class outputs; ``compile``: f32) at each
   batch size. On CUDA the actor puts the networks in channels_last, and a backend that fails its
   guard (over its first images) runs the one it falls back to (the record names both). Each pass runs twice
   and the second is timed (the first autotunes cuDNN and compiles), between
   ``torch.cuda.synchronize()`` calls; each compile starts from ``torch._dynamo.reset()``, as a
   fresh actor would.
2. GPU load over every timed measurement: ``nvidia-smi`` every 0.2 s (pynvml where there is no
   nvidia-smi; None where neither works): mean and p90 utilisation, peak device memory used, and
   torch's own peak allocation.
3. The decode ceiling, over the same images: the pipeline's ``read_and_decode`` stage (OpenCV,
   reduced JPEG decode + INTER_AREA) in a process pool of one process per CPU core, one OpenCV
   thread each; and nvJPEG, ``skinray.data.device_decode.decode_jpegs`` on batches of file bytes
   (full decode, EXIF orientation, antialiased resize to the same size) at each batch size.
4. Where ``import ray`` works: ``run_scoring`` with ``use_gpu`` (decoding in the CPU tasks, then
   with ``jpeg_decode_in_segmenter``), Ray's documented pattern as score_pipeline runs it
   (``plain_pattern``: its models stay on CPU) and the same pattern with its models on the GPU
   (fp32, ``num_gpus=1``); the pipeline at the batch size where eager ran fastest.
5. The accuracy guard of each backend against eager (score_pipeline's ``accuracy_guard``) at each
   batch size, on the outputs of the timed passes.

Prints a table and writes one JSON: ``--out``, by default ``$OUT/score_gpu.json`` where ``$OUT`` is
set, else ``runs/score_gpu.json``. The JSON is rewritten after each section, so a run cut short
keeps what it measured; a measurement that fails is recorded with its error and the run goes on
(exit status 1 at the end). ``--device cuda`` without CUDA stops at once with exit status 2.

On the lent device machine: ``../shared`` does not travel with the checkout, so first copy the
images into a folder of the checkout that git ignores, here, once::

    mkdir -p .devdata && cp -r ../shared/data/isic2017_fullres .devdata/ \\
        && echo /.devdata/ >> .git/info/exclude

then run with ``.devdata`` in the call's ``carry`` (and ``PYTHONUNBUFFERED=1`` for live output)::

    source .devbundle/activate && python bench/score_gpu.py --n 440 \\
        --images .devdata/isic2017_fullres/images

The 110 images are 51.7 MiB of the 64 MiB a call may carry with the tree; where that is too much,
copy a subset (the picks spread over whatever folder ``--images`` names). Device time is short:
each compile pass pays torch.compile's compilation, so ``--backends eager`` or fewer batch sizes
cut the run. Smoke test without a GPU::

    .venv/bin/python bench/score_gpu.py --device cpu --n 8 --batch-sizes 4 --skip-pipeline \\
        --workdir /tmp/score_gpu_smoke
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))  # bench/ is a folder of scripts, not a package
import score_pipeline as sp  # noqa: E402

MIB = 1024 * 1024
SAMPLE_INTERVAL_S = 0.2
#: The backends that run on a GPU (skinray.backends.BACKENDS less OpenVINO's, which run on CPU).
BACKENDS = ("eager", "eager-bf16", "eager-mixed", "compile")


# ---------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0))


def open_device(name: str):
    """The torch device, or exit 2 with one line where CUDA is asked for and absent."""
    if name == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # PredictActor takes any GPU it sees
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        print(
            f"score_gpu: --device cuda, but torch {torch.__version__} (CUDA "
            f"{torch.version.cuda}) sees no CUDA device; --device cpu runs the smoke test",
            file=sys.stderr,
        )
        sys.exit(2)
    return torch.device(name)


def prepare(workdir: Path, n: int, source: Path, model_set: str) -> dict:
    """``n`` images picked as score_pipeline picks them, linked into one folder; the models."""
    sources = sorted(source.glob("*.jpg"))
    for path in sources:  # into the page cache, so no measurement pays for a cold read
        path.read_bytes()
    picked = sp.pick_images(sources, n)
    return {
        "source": str(source),
        "images": str(sp.link_images(picked, workdir / f"images_{n}", repeat=1)),
        "picked_images": sp.describe_images(picked),
        "all_source_images": sp.describe_images(sources),
        "models": sp.save_models(workdir / "models", model_set),
    }


def make_config(inputs: dict, workdir: Path, **update):
    """score_pipeline's run config, less int8's calibration images: GPUs run no int8, and they
    lie under ../shared, which does not travel to the lent device machine (the door would stop
    every Ray run there for a missing input)."""
    config = sp.score_config(inputs["images"], workdir / "out", inputs["models"], "score_gpu")
    return config.model_copy(update={"int8_calibration": None, **update})


def decode_size(config) -> tuple[int, int]:
    """What the pipeline decodes to: the segmenter's input, or the classifier's ROI source size."""
    from skinray.score.plan import read_scoring_models

    return tuple(read_scoring_models(config).input_size)


# ---------------------------------------------------------------------------------------------
# GPU load and timing
# ---------------------------------------------------------------------------------------------


def gpu_index() -> int:
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def nvidia_smi_reader(index: int):
    command = [
        "nvidia-smi",
        f"--id={index}",
        "--query-gpu=utilization.gpu,memory.used",
        "--format=csv,noheader,nounits",
    ]

    def read() -> tuple[float, float]:
        line = subprocess.run(command, capture_output=True, text=True, timeout=5).stdout
        utilisation, used = line.strip().splitlines()[0].split(",")
        return float(utilisation), float(used)

    return read


def pynvml_reader(index: int):
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)

    def read() -> tuple[float, float]:
        utilisation = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
        return float(utilisation), pynvml.nvmlDeviceGetMemoryInfo(handle).used / MIB

    return read


def gpu_reader() -> tuple:
    """``(read, source)``: a function giving (utilisation %, memory used MiB), or (None, None)."""
    makers = [("pynvml", pynvml_reader)]
    if shutil.which("nvidia-smi"):
        makers.insert(0, ("nvidia-smi", nvidia_smi_reader))
    for source, make in makers:
        try:
            read = make(gpu_index())
            read()
            return read, source
        except Exception:  # absent, no driver, N/A fields (MIG): try the next, else None
            continue
    return None, None


class GpuSampler(threading.Thread):
    """GPU utilisation and memory used every ``interval_s`` while a measurement runs."""

    def __init__(self, read, source: str | None, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        super().__init__(daemon=True)
        self.read, self.source, self.interval_s = read, source, interval_s
        self.samples: list[tuple[float, float]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while self.read is not None and not self.done.is_set():
            started = time.perf_counter()
            with contextlib.suppress(Exception):
                self.samples.append(self.read())
            self.done.wait(max(0.0, self.interval_s - (time.perf_counter() - started)))

    def stop(self) -> dict | None:
        self.done.set()
        self.join()
        if self.read is None:
            return None
        utilisation = np.array([s[0] for s in self.samples])
        used = [s[1] for s in self.samples]
        return {
            "source": self.source,
            "samples": len(self.samples),
            "interval_s": self.interval_s,
            "util_mean_pct": round(float(utilisation.mean()), 1) if len(used) else None,
            "util_p90_pct": round(float(np.percentile(utilisation, 90)), 1) if len(used) else None,
            "memory_used_peak_mib": round(max(used)) if used else None,
        }


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def watched(device, record: dict, reader: tuple):
    """The block's wall time between synchronisations, with the GPU sampled throughout."""
    import torch

    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sampler = GpuSampler(*reader)
    sampler.start()
    started = time.perf_counter()
    try:
        yield record
    finally:
        synchronize(device)
        record["wall_s"] = round(time.perf_counter() - started, 3)
        record["gpu"] = sampler.stop()
        if device.type == "cuda":
            record["torch_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / MIB)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def one_opencv_thread() -> None:
    import cv2

    cv2.setNumThreads(1)


def cpu_decode(listing: dict, size, max_pixels: int, rows: int) -> tuple[dict, dict]:
    """``read_and_decode`` over every core (second pass timed), and the decoded batch."""
    from skinray.score.stages import read_and_decode

    count, workers = len(listing["source_uri"]), cpu_cores()
    chunks = [{k: v[i : i + rows] for k, v in listing.items()} for i in range(0, count, rows)]
    decode = functools.partial(read_and_decode, image_size=tuple(size), max_pixels=max_pixels)
    spawn = multiprocessing.get_context("spawn")  # no fork of a process holding a CUDA context
    with ProcessPoolExecutor(workers, mp_context=spawn, initializer=one_opencv_thread) as pool:
        list(pool.map(decode, chunks))  # warm-up: the processes started and their imports done
        started = time.perf_counter()
        batches = list(pool.map(decode, chunks))
        wall_s = time.perf_counter() - started
    decoded = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
    record = {
        "images": count,
        "errors": int(sum(stage != "" for stage in decoded["error_stage"])),
        "processes": workers,
        "opencv_threads_per_process": 1,
        "rows_per_task": rows,
        "wall_s": round(wall_s, 3),
        "images_per_s": round(count / wall_s, 2),
        "images_per_s_per_process": round(count / wall_s / workers, 2),
    }
    return record, decoded


def jpeg_files(folder: str) -> tuple[list[bytes], list[int]]:
    from skinray.data.decode import screen_jpeg

    data = [path.read_bytes() for path in sorted(Path(folder).iterdir())]
    screens = [screen_jpeg(item) for item in data]
    return data, [s.orientation if s else 1 for s in screens]


def device_decode(files: tuple, size, device, batch_size: int, reader: tuple) -> dict:
    """``decode_jpegs`` on ``device`` over batches of file bytes (second pass timed)."""
    from skinray.data.device_decode import decode_jpegs

    data, orientations = files

    def one_pass() -> int:
        refused = 0
        for i in range(0, len(data), batch_size):
            out = decode_jpegs(
                data[i : i + batch_size], orientations[i : i + batch_size], size, device
            )
            refused += sum(image is None for image in out)
        return refused

    one_pass()
    record = {"images": len(data), "batch_size": batch_size}
    with watched(device, record, reader):
        record["refused"] = one_pass()
    record["images_per_s"] = round(len(data) / record["wall_s"], 2)
    return record


def decode_section(listing: dict, config, size, device, args, reader) -> tuple[dict, dict]:
    cpu, decoded = cpu_decode(listing, size, config.max_pixels, config.decode_batch_size)
    out = {"cpu_read_and_decode": cpu}
    files = jpeg_files(config.input)
    for batch_size in args.batch_sizes:
        name = f"{device.type}_decode_jpegs_bs{batch_size}"
        out[name] = attempt(name, device_decode, files, size, device, batch_size, reader)
    return out, decoded


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def model_pass(decoded: dict, models: dict, backend: str, batch_size: int, device, reader):
    """PredictActor over the decoded images, second pass timed; the record and the outputs."""
    import torch

    from skinray.score.actors import PredictActor

    if backend == "compile":
        torch._dynamo.reset()  # compile from scratch, as in a fresh actor process
    predict = PredictActor(
        models["segmenter"],
        models["classifier"],
        batch_size,
        cpu_threads=cpu_cores(),
        backend=backend,
    )
    warm_s, _ = sp.time_stage(predict, decoded, batch_size)
    count = len(decoded["source_uri"])
    record = {"backend_asked": backend, "batch_size": batch_size, "images": count}
    with watched(device, record, reader):
        predict_s, outputs = sp.time_stage(predict, decoded, batch_size)
    record.update(
        backend=predict.backend,
        fallback_reason=predict.fallback_reason,
        warmup_s=round(warm_s, 2),
        predict_s=round(predict_s, 3),
        images_per_s=round(count / predict_s, 2),
        **row_errors(outputs),
    )
    return record, outputs


def row_errors(outputs: list[dict]) -> dict:
    """The rows the actor turned into errors (it fails rows, not the call, on a bad batch)."""
    failed = [
        m for o in outputs for s, m in zip(o["error_stage"], o["error_message"], strict=True) if s
    ]
    out = {"row_errors": len(failed)}
    if failed:
        out["error"] = f"{len(failed)} rows failed, first: {failed[0]}"
    return out


def models_section(decoded: dict, models: dict, args, device, reader) -> dict:
    """Each backend at each batch size; each one's outputs guarded against eager's."""
    out = {}
    backends = sorted(args.backends, key=lambda b: b != "eager")  # eager first: the reference
    for batch_size in args.batch_sizes:
        reference = None
        for backend in backends:
            name = f"{backend}_bs{batch_size}"
            result = attempt(name, model_pass, decoded, models, backend, batch_size, device, reader)
            if isinstance(result, dict):  # the error record
                out[name] = result
                continue
            out[name], outputs = result
            if backend == "eager":
                reference = outputs
            elif reference is not None:
                out[name]["guard"] = sp.accuracy_guard(reference, outputs, backend)
    return out


def best_batch_size(models: dict, default: int) -> int:
    eager = [r for r in models.values() if r.get("backend_asked") == "eager" and "error" not in r]
    return max(eager, key=lambda r: r["images_per_s"])["batch_size"] if eager else default


# ---------------------------------------------------------------------------------------------
# Ray: the pipeline and the documented pattern
# ---------------------------------------------------------------------------------------------


class _OnDevice:
    """A network fed CPU tensors and giving CPU outputs, run on ``device``."""

    def __init__(self, network, device: str) -> None:
        self.network, self.device = network.to(device), device
        self.saved_config = network.saved_config

    def __call__(self, x):
        return {key: value.cpu() for key, value in self.network(x.to(self.device)).items()}


class GpuPlainPredictor(sp.PlainPredictor):
    """score_pipeline's (d) with its networks on the GPU, fp32 as the docs write it."""

    def __init__(self, segmenter: str, classifier: str) -> None:
        super().__init__(segmenter, classifier)
        self.segmenter = _OnDevice(self.segmenter, "cuda")
        self.classifier = _OnDevice(self.classifier, "cuda")


def plain_pattern_gpu(images: str, config, size) -> dict:
    """(d) as ``plain_pattern`` runs it, on one GPU actor."""
    import ray

    started = time.perf_counter()
    dataset = ray.data.read_images(images, size=tuple(size), mode="RGB").map_batches(
        GpuPlainPredictor,
        fn_constructor_kwargs={"segmenter": config.segmenter, "classifier": config.classifier},
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=config.batch_size,
        num_gpus=1,
    )
    count = sum(len(batch["mask"]) for batch in dataset.iter_batches(batch_size=None))
    wall_s = time.perf_counter() - started
    return {"images": count, "wall_s": round(wall_s, 2), "images_per_s": count / wall_s}


def warm_ray(config, size, workdir: Path) -> None:
    """One small decode job first: Ray Data's first job starts the workers and their imports."""
    warm = workdir / "warmup_images"
    if warm.exists():
        shutil.rmtree(warm)
    warm.mkdir(parents=True)
    for path in sorted(Path(config.input).iterdir())[: config.decode_batch_size]:
        (warm / path.name).symlink_to(path.resolve())
    sp.decode_only(str(warm), config, size)


def ray_runs(inputs: dict, workdir: Path, device, batch_size: int) -> dict:
    gpu = device.type == "cuda"

    def config(**update):
        return make_config(inputs, workdir, use_gpu=gpu, batch_size=batch_size, **update)

    size = decode_size(config())
    runs = {
        "pipeline_cpu_decode": lambda: sp.run_pipeline(config()),
        "pipeline_jpeg_decode_in_segmenter": lambda: sp.run_pipeline(
            config(jpeg_decode_in_segmenter=True)
        ),
        "plain_pattern_models_on_cpu": lambda: sp.plain_pattern(inputs["images"], config(), size),
    }
    if gpu:
        runs["plain_pattern_models_on_gpu"] = lambda: plain_pattern_gpu(
            inputs["images"], config(), size
        )
    return runs


def ray_section(inputs: dict, workdir: Path, device, batch_size: int, reader) -> dict:
    try:
        import ray
    except ImportError as error:
        return {"skipped": f"ray is not importable ({type(error).__name__}: {error})"}
    ray.cloudpickle.register_pickle_by_value(sp)  # Ray's workers cannot import bench/ scripts
    sp.start_ray(cpu_cores())
    try:
        warm_config = make_config(inputs, workdir, batch_size=batch_size)
        warm_ray(warm_config, decode_size(warm_config), workdir)
        out = {"batch_size": batch_size, "resources": ray.cluster_resources()}
        for name, run in ray_runs(inputs, workdir, device, batch_size).items():
            out[name] = attempt(name, watched_run, run, device, reader)
    finally:
        ray.shutdown()
    return out


def watched_run(run, device, reader) -> dict:
    record: dict = {}
    with watched(device, record, reader):
        result = run()
    return {**result, "gpu": record["gpu"]}  # the models run in an actor, not in this process


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def attempt(label: str, function, *args):
    """``function(*args)``, or a record of its error: one failed measurement must not end the
    run on a device lent for minutes."""
    print(f"[{dt.datetime.now():%H:%M:%S}] {label}", flush=True)
    try:
        return function(*args)
    except Exception as error:
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {error}"}


def machine(device) -> dict:
    import torch
    import torchvision

    try:
        info = sp.machine()  # imports ray (for its psutil)
    except ImportError as error:
        info = {"nproc": os.cpu_count(), "python": platform.python_version(), "ray": str(error)}
    info.update(
        cpu_cores_usable=cpu_cores(),
        torch=torch.__version__,
        torchvision=torchvision.__version__,
        torch_cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    )
    return info


def table_rows(results: dict) -> list[tuple[str, dict]]:
    rows = [(f"decode: {name}", r) for name, r in results.get("decode", {}).items()]
    rows += [(f"models: {name}", r) for name, r in results.get("models", {}).items()]
    ray_results = results.get("ray") or {}
    rows += [
        (f"ray: {k}", r) for k, r in ray_results.items() if isinstance(r, dict) and k != "resources"
    ]
    return rows


def print_table(results: dict) -> None:
    print(f"\n{'measurement':52}{'images/s':>10}{'util mean':>11}{'p90':>7}{'peak MiB':>10}")
    for label, r in table_rows(results):
        rate = r.get("images_per_s", r.get("timed_images_per_s"))
        gpu = r.get("gpu") or {}
        cells = [gpu.get("util_mean_pct"), gpu.get("util_p90_pct"), gpu.get("memory_used_peak_mib")]
        text = f"{rate:>10.2f}" if rate is not None else f"{'—':>10}"
        print(f"{label:52}{text}{cells[0]!s:>11}{cells[1]!s:>7}{cells[2]!s:>10}")
        for key in ("guard", "fallback_reason", "error", "skipped"):
            if r.get(key):
                print(f"    {key}: {r[key]}")
    if "skipped" in (results.get("ray") or {}):
        print(f"ray: skipped: {results['ray']['skipped']}")


def summarise(results: dict) -> dict:
    """The fastest models per backend that ran (only where it passed the guard) against decode."""
    models = [r for r in results["models"].values() if "images_per_s" in r]
    best = {
        backend: max(
            (
                r["images_per_s"]
                for r in models
                if r["backend"] == backend and (r.get("guard") or {"passed": True})["passed"]
            ),
            default=None,
        )
        for backend in sorted({r["backend"] for r in models})
    }
    decode = results["decode"]
    cpu = decode["cpu_read_and_decode"]["images_per_s"]
    device = [r.get("images_per_s") for k, r in decode.items() if k != "cpu_read_and_decode"]
    fastest = max((rate for rate in best.values() if rate), default=None)
    return {
        "models_best_images_per_s": best,
        "cpu_decode_images_per_s": cpu,
        "device_decode_best_images_per_s": max((r for r in device if r), default=None),
        "cpu_decode_over_fastest_models": sp.ratio(cpu, fastest),
    }


def errors_in(results: dict) -> list[str]:
    sections = [results.get(k) or {} for k in ("decode", "models", "ray")]
    return [
        f"{name}: {r['error']}"
        for s in sections
        for name, r in s.items()
        if isinstance(r, dict) and "error" in r
    ]


def save(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=440, help="images (picked as score_pipeline does)")
    parser.add_argument("--images", default=str(sp.SOURCE_IMAGES), help="folder of source JPEGs")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "score_gpu"))
    parser.add_argument("--out", default=None, help="JSON; default $OUT/score_gpu.json or runs/")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--batch-sizes", nargs="+", type=int_list, default=[[16, 64, 128]])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=None)
    parser.add_argument("--skip-pipeline", action="store_true", help="no Ray measurements")
    parser.add_argument("--model-set", choices=("released", "random"), default="released")
    args = parser.parse_args(argv)
    args.batch_sizes = sorted({size for sizes in args.batch_sizes for size in sizes})
    args.backends = args.backends or list(BACKENDS)
    output = os.environ.get("OUT")
    default = Path(output) / "score_gpu.json" if output else REPO / "runs" / "score_gpu.json"
    args.out = Path(args.out) if args.out else default
    return args


def settings(args, config, size) -> dict:
    from skinray.score.plan import read_scoring_models

    return {
        "n": args.n,
        "device": args.device,
        "batch_sizes": args.batch_sizes,
        "backends": args.backends,
        "decode_size": list(size),
        "decode_rows_per_task": config.decode_batch_size,
        "precision": "per backend (eager and compile f32, eager-bf16 and eager-mixed bf16 "
        "autocast); channels_last on CUDA",
        "timing": "second pass of two, between torch.cuda.synchronize() calls",
        "gpu_sample_interval_s": SAMPLE_INTERVAL_S,
        "model_set": args.model_set,
        **read_scoring_models(config).identity,  # each model's name and weights' SHA-256
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    source = Path(args.images).resolve()  # the links must not be relative to the workdir
    if not any(source.glob("*.jpg")):
        print(f"score_gpu: no JPEGs in {source} (see --images)", file=sys.stderr)
        sys.exit(2)
    device = open_device(args.device)
    workdir = Path(args.workdir).resolve()
    started = dt.datetime.now(dt.UTC)
    inputs = prepare(workdir, args.n, source, args.model_set)
    config = make_config(inputs, workdir)
    size = decode_size(config)
    reader = gpu_reader()
    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(device),
        "settings": {**settings(args, config, size), "gpu_sampler": reader[1]},
        "inputs": inputs,
    }
    save(results, args.out)
    from skinray.score.sources import list_inputs

    listing = list_inputs(config.input).to_pydict()
    results["decode"], decoded = decode_section(listing, config, size, device, args, reader)
    save(results, args.out)
    results["models"] = models_section(decoded, inputs["models"], args, device, reader)
    del decoded
    save(results, args.out)
    if args.skip_pipeline:
        results["ray"] = {"skipped": "--skip-pipeline"}
    else:
        batch_size = best_batch_size(results["models"], config.batch_size)
        results["ray"] = ray_section(inputs, workdir, device, batch_size, reader)
    results["summary"] = summarise(results)
    results["errors"] = errors_in(results)
    save(results, args.out)
    print_table(results)
    print(f"\nsummary: {json.dumps(results['summary'])}")
    print(f"\nwrote {args.out}")
    sys.exit(1 if results["errors"] else 0)


if __name__ == "__main__":
    main()
