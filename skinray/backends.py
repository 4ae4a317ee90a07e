"""Execution backends: the same networks, run by eager PyTorch (in f32, or under bf16 autocast),
``torch.compile`` or OpenVINO.

A backend replaces the networks inside a ``skinray.predict.Predictor`` and nothing else: resizing,
normalisation, guidance, the ROI cut, sigmoid/softmax, temperature and threshold stay the Predictor's,
so every backend runs the one prediction path. ``accelerated`` returns a new Predictor whose networks
run on the backend, or the eager one with the reason when the backend cannot take the model (an
operator the exporter or runtime lacks). ``compare_predictions`` is the accuracy guard: per-image
mask Jaccard against eager and the largest class-probability difference.

OpenVINO was chosen over ONNX Runtime by measurement (docs/benchmarks.md): on this project's 2-core
AMD EPYC, U-Net ResNet34 at 256 px, batch 16, 2 threads, eager ran 6.3 images/s, ONNX Runtime 10.7,
OpenVINO f32 11.7 and OpenVINO bf16 24.3. ``openvino`` runs f32; ``openvino-bf16`` asks OpenVINO
for bf16 arithmetic, which its CPU plugin gives on CPUs with AVX-512 or AVX2-VNNI-2 (natively fast
with AVX512_BF16 or AMX) and silently refuses elsewhere (such runs are reported as ``openvino``),
and is held to the same guard;
``openvino-mixed`` runs the networks without class outputs (segmenters) in bf16 and those with class
outputs in f32, for a pair whose masks hold in bf16 and whose probabilities do not (the released
classifier's moved by up to 0.087 in bf16). ``openvino-int8`` runs the networks without class outputs
quantised to int8 by NNCF's post-training quantisation (their unquantised operations in bf16, as
``openvino-mixed``) and those with class outputs in f32: quantised too, the released HAM10000
classifier's probabilities moved by up to 0.27 and its balanced accuracy by 1.1 points, to save
1.3 ms an image on one core (its 3.0 in f32; the segmenter's 7.8 in bf16, 4.6 in int8). A model
with nothing to quantise runs, and is reported, as ``openvino``; without calibration images int8
runs as ``openvino-mixed``.
``eager-bf16`` runs every network in eager PyTorch under bf16 autocast, on any device, and
``eager-mixed`` only the networks without class outputs: eager itself runs f32 on every device
(on CUDA, cuDNN's convolutions in TF32, PyTorch's default), so bf16 is a backend the guard judges
like any other (the released classifier's probabilities moved by up to 0.040 under autocast on CPU).
Segmenters are calibrated on real images, each on what it sees when the eager Predictor runs on
them (resized, normalised), and the quantised network is cached by its weights, a digest of the
calibration images and the model that turns them into each network's inputs, and NNCF's and
OpenVINO's versions and NNCF's settings, so an actor whose quantisation is cached runs nothing on
the images.
Networks are exported to ONNX when first asked for and cached under ``cache_dir`` by the SHA-256
of their weights, of the code that computes them and their input shape, so the actors of a node
export once. A composite whose glue does not export (the two-step ROI cut) runs its networks on
the backend and its glue in PyTorch.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import inspect
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from skinray.models.two_step import TwoStep

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKENDS",
    "GUARD_FALLBACK",
    "INT8_CALIBRATION_IMAGES",
    "AutocastNetwork",
    "GuardResult",
    "GuardedPredictor",
    "OpenVinoNetwork",
    "accelerated",
    "calibration_sha256",
    "compare_predictions",
    "default_backend",
    "network_inputs",
    "openvino_runs_bf16",
    "read_calibration_images",
    "runtime_versions",
]

log = logging.getLogger(__name__)

BACKENDS = (
    "eager",
    "eager-bf16",
    "eager-mixed",
    "compile",
    "openvino",
    "openvino-bf16",
    "openvino-mixed",
    "openvino-int8",
)
#: What an actor tries next when a backend fails the accuracy guard (then eager): reduced precision
#: falls back to the same runtime with the class outputs at full precision, then to all of it.
GUARD_FALLBACK = {
    "eager-bf16": "eager-mixed",
    "eager-mixed": "eager",
    "openvino-bf16": "openvino-mixed",
    "openvino-int8": "openvino-mixed",
    "openvino-mixed": "openvino",
}
#: OpenVINO inference precision per backend; "mixed": bf16 for a network without class outputs,
#: f32 for one with; "int8": a network without class outputs quantised (NNCF), its unquantised
#: operations in bf16, one with class outputs in f32.
_OPENVINO_PRECISION = {
    "openvino": "f32",
    "openvino-bf16": "bf16",
    "openvino-mixed": "mixed",
    "openvino-int8": "int8",
}
#: Which networks run under bf16 autocast, per eager backend: every one, or those without class
#: outputs.
_AUTOCAST = {"eager-bf16": "all", "eager-mixed": "mixed"}
#: Calibration images int8 takes at most (NNCF's default ``subset_size``).
INT8_CALIBRATION_IMAGES = 300
#: The fastest backend that passed the accuracy guard, per device type, as bench/score_pipeline.py
#: measured it (docs/benchmarks.md); a device type not here runs eager. CPU, the released pair on
#: 440 archive images, 2 threads: eager 31.3 images/s, compile 42.9, openvino 67.3, openvino-mixed
#: 109.5 (openvino-bf16 failed the guard: a class probability moved 0.037); the pipeline over
#: 4,400 images ran 92.5 and 93.8 images/s on openvino-int8 against 75.2 and 81.5 on
#: openvino-mixed. Each moves the released models' validation figures by at most 0.4 point (ISIC
#: 2017 thresholded Jaccard 0.6891 → 0.6931 and 0.6930), within the 0.5 a reduced-precision
#: default may. int8 needs calibration images: without them the default is its GUARD_FALLBACK.
#: CUDA: ``eager-mixed``, the bf16 autocast that the actors ran on every network, unguarded,
#: before it became a backend, kept for the networks without class outputs: under it the released
#: models' validation figures moved by at most 0.44 point (ISIC 2017 thresholded Jaccard 0.6891 →
#: 0.6935; the pair's class figures not at all), where ``eager-bf16`` moved the pair's ECE by 0.58
#: point (0.0328 → 0.0270) and fails its guard (bf16 autocast on CPU, docs/benchmarks.md). GPUs are
#: not measured yet (bench/score_gpu.py measures each backend).
DEFAULT_BACKENDS: dict[str, str] = {"cpu": "openvino-int8", "cuda": "eager-mixed"}
#: The guard's bounds (fp32 backends): mean per-image mask Jaccard against eager, and the largest
#: absolute difference of a class probability, and of an OOD score (its threshold was set on
#: eager's features).
MIN_MASK_JACCARD = 0.99
MAX_PROBABILITY_DIFFERENCE = 0.01
MAX_OOD_SCORE_DIFFERENCE = 0.01  # the released thresholds are 0.50 and 0.56, on a 0-2 score
#: int8's guard, against a broken quantisation (whose classes agree with eager's about as often
#: as chance, 1 in 7 for HAM10000), not a bound on accuracy: the released segmenter quantised on
#: 300 ISIC 2017 training images kept mask Jaccard 0.988 against eager on 440 archive images. Its
#: classifiers run f32, so classes move only where a ROI classifier's box follows the int8 mask.
INT8_MIN_MASK_JACCARD = 0.95
INT8_MIN_CLASS_AGREEMENT = 0.75
#: Images a backend is compared with eager on before it runs alone. One image is no verdict: on
#: the released pair, ``openvino-bf16`` passed on each of 5 of its first 16 ISIC 2017 validation
#: images alone and failed on the 16 together (a probability moved 0.0996).
GUARD_MIN_IMAGES = 32
_OPSET = 17
#: NNCF's post-training quantisation settings beyond its defaults (none: the defaults are what
#: docs/benchmarks.md measured). With NNCF's and OpenVINO's versions they name every cached int8
#: network, so a node that upgrades either, or a change here, quantises again instead of reusing another's network
#: under the same calibration digest.
_NNCF_SETTINGS: dict[str, object] = {}


def default_backend(device: torch.device | str, calibrated: bool = False) -> str:
    """The device's default backend; ``calibrated``: int8 calibration images are at hand."""
    backend = DEFAULT_BACKENDS.get(torch.device(device).type, "eager")
    if backend == "openvino-int8" and not calibrated:
        return GUARD_FALLBACK[backend]
    return backend


@functools.cache
def openvino_runs_bf16() -> bool:
    """Whether OpenVINO's CPU plugin runs bf16 on this machine: it keeps f32, silently, on a CPU
    without AVX-512 or AVX2-VNNI-2 (read back from a one-operation network compiled for bf16)."""
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([1, 4], ov.Type.f32)
    settings = {"INFERENCE_PRECISION_HINT": "bf16"}
    compiled = ov.Core().compile_model(ov.Model([ops.relu(x)], [x]), "CPU", settings)
    return compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "bf16"


def default_cache_dir() -> Path:
    root = os.environ.get("SKINRAY_CACHE") or Path(tempfile.gettempdir()) / "skinray-cache"
    return Path(root) / "onnx"


# -- OpenVINO --------------------------------------------------------------------------------------
class OpenVinoNetwork(nn.Module):
    """An exported network compiled by OpenVINO for the CPU; ``forward`` returns the registry's
    output dict on the input's device, as the eager network does. ``precision`` is the inference
    precision asked for, ``f32`` or ``bf16``; ``runs_in`` is the one OpenVINO chose, read back from
    the compiled network: its CPU plugin takes bf16 only on CPUs it supports it on (AVX-512 or
    AVX2-VNNI-2) and silently keeps f32 elsewhere.

    With ``threads`` given, the network runs as that many single-thread streams (OpenVINO's
    THROUGHPUT hint), each batch split among them and run as parallel requests. One request
    over all threads (the LATENCY hint) waits at every layer for its slowest thread, and in a
    scoring node the decode tasks share the cores: 2 threads with one core taken by JPEG
    decoding ran the released pair at 75.3 images/s as one request and 92.3 as two streams
    (162 and 166 with the cores free)."""

    def __init__(
        self,
        path: Path,
        output_names: Sequence[str],
        threads: int | None = None,
        precision: str = "f32",
        quantised: bool = False,
    ):
        super().__init__()
        import openvino as ov

        settings = {
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "THROUGHPUT" if threads else "LATENCY",
            # OpenVINO's own cache of compiled networks, beside the exports: an actor that starts
            # after the first loads the compiled blob instead of compiling again.
            "CACHE_DIR": str(path.parent / "openvino"),
        }
        if threads:
            # No pinning: OpenVINO pins each process's stream threads to cores counting from the
            # first, unaware of other processes, and a node's model actors and decode tasks share
            # its cores. Two single-thread actors on 2 CPUs ran the released segmenter at 124.0
            # images/s together pinned and 227.0 unpinned.
            settings.update(
                NUM_STREAMS=int(threads),
                INFERENCE_NUM_THREADS=int(threads),
                ENABLE_CPU_PINNING=False,
            )
        self.compiled = ov.Core().compile_model(str(path), "CPU", settings)
        # OpenVINO runs no more streams than the machine has cores.
        streams = int(self.compiled.get_property("NUM_STREAMS")) if threads else 1
        self.requests = [self.compiled.create_infer_request() for _ in range(streams)]
        self.output_names = list(output_names)
        self.path, self.precision, self.quantised = path, precision, quantised
        self.runs_in = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        count = len(x)
        if count == 0:  # no ROI in a batch: OpenVINO refuses an empty batch, eager returns one
            x = x.new_zeros((1, *x.shape[1:]))
        chunks = np.array_split(x.detach().float().cpu().numpy(), min(self.streams, len(x)))
        running = self.requests[: len(chunks)]
        for request, chunk in zip(running, chunks, strict=True):
            request.start_async({0: chunk})
        for request in running:
            request.wait()
        # concatenate copies out of the requests' buffers, which the next call reuses.
        return {
            name: torch.from_numpy(
                np.concatenate([r.get_output_tensor(i).data for r in running])[:count]
            ).to(x.device)
            for i, name in enumerate(self.output_names)
        }

    @property
    def streams(self) -> int:
        return len(self.requests)


class _AsTuple(nn.Module):
    """The network with its output dict as a tuple in a fixed order, for the exporter."""

    def __init__(self, network: nn.Module, names: Sequence[str]):
        super().__init__()
        self.network, self.names = network, list(names)

    def forward(self, x):
        outputs = self.network(x)
        return tuple(outputs[name] for name in self.names)


@contextlib.contextmanager
def _restoring(modes: dict[nn.Module, bool]):
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def weights_digest(network: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def code_digest(network: nn.Module) -> str:
    """SHA-256 (16 hex) of torch's version and the source files of every module class in
    ``network``: with the weights, what names its export, so that a cached export is not run
    after the code that computes the network changes (a skinray, timm or torch upgrade on a node
    that keeps its cache) under the same weights."""
    digest = hashlib.sha256(torch.__version__.encode())
    for source in sorted({_source_file(type(module)) for module in network.modules()} - {None}):
        digest.update(Path(source).read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def _source_file(cls: type) -> str | None:
    try:
        return inspect.getsourcefile(cls)
    except TypeError:  # a class without a Python source file
        return None


def exported_network(
    network: nn.Module,
    input_shape: Sequence[int],
    cache_dir: Path | None = None,
    threads: int | None = None,
    precision: str = "f32",
    calibration: Calibration | None = None,
) -> OpenVinoNetwork:
    """``network`` (eval mode) exported to ONNX for inputs (N, *input_shape) with N free, cached by
    its weights, its code (``code_digest``) and shape, and compiled by OpenVINO; for ``precision``
    int8, a network without class outputs quantised on ``calibration`` first."""
    channels, height, width = (int(s) for s in input_shape)
    example = torch.zeros(2, channels, height, width)
    names = _output_names(network, input_shape)
    classifies = "class_logits" in names
    if precision == "mixed":
        precision = "f32" if classifies else "bf16"
    if precision == "int8" and classifies:
        precision = "f32"  # quantised, the released classifier's probabilities moved up to 0.27
    cache_dir = cache_dir or default_cache_dir()
    outputs = hashlib.sha256(",".join(names).encode()).hexdigest()[:8]  # a new output, a new file
    shape = f"{channels}x{height}x{width}"
    name = f"{weights_digest(network)}-{code_digest(network)}-{shape}-{outputs}-op{_OPSET}"
    path = cache_dir / f"{name}.onnx"
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        # The exporter exports in eval mode and then restores the top module's mode recursively,
        # which would put eval children of a train-mode parent (an assembled two-step pair) in
        # train mode: every module's own mode is put back here instead.
        modes = {module: module.training for module in network.modules()}
        wrapper = _AsTuple(network, names)
        with _restoring(modes), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's tracer warnings are about shapes
            torch.onnx.export(
                wrapper,
                (example,),
                str(partial),
                input_names=["input"],
                output_names=names,
                dynamic_axes={"input": {0: "batch"}, **{n: {0: "batch"} for n in names}},
                opset_version=_OPSET,
                dynamo=False,
            )
        os.replace(partial, path)  # atomic: actors exporting side by side never read half a file
    if precision == "int8":
        if calibration is None:
            raise ValueError("int8 needs calibration images (none given, or none could be read)")
        path = _quantised(path, calibration, network)
        return OpenVinoNetwork(path, names, threads, "bf16", quantised=True)
    return OpenVinoNetwork(path, names, threads, precision)


@dataclass(frozen=True)
class Calibration:
    """int8's calibration: ``digest`` names it (the images and the model that turns them into
    its networks' inputs); ``inputs`` computes each network's inputs, only where a quantisation
    is not cached yet."""

    digest: str
    inputs: Callable[[], dict[nn.Module, np.ndarray]]


def calibration_sha256(images: np.ndarray) -> str:
    """SHA-256 of int8's calibration images (N×H×W×3 uint8): their shape and pixels."""
    digest = hashlib.sha256(repr(images.shape).encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    return digest.hexdigest()


def _calibration(predictor, images: np.ndarray | None) -> Calibration | None:
    if images is None or not len(images):
        return None
    digest = hashlib.sha256(calibration_sha256(images).encode())
    # The segmenter's weights and the Predictor's resizing and normalisation shape a pair's
    # classifier inputs too, so they are part of every network's calibration.
    digest.update(weights_digest(predictor.model).encode())
    # Test-time flips add each image's two flipped views to the networks' calibration inputs.
    settings = (predictor.input_size, predictor.mean, predictor.std, predictor.test_time_flips)
    digest.update(repr(settings).encode())
    inputs = functools.cache(lambda: network_inputs(predictor, images))
    return Calibration(digest.hexdigest()[:16], inputs)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:  # the backend that needs it says how to install it
        return "absent"


def _quantiser() -> str:
    """What quantises: NNCF's and OpenVINO's versions (NNCF writes the network through OpenVINO,
    and rows name the OpenVINO that runs it) and the settings ``_quantised`` gives it."""
    versions = f"nncf {_version('nncf')} openvino {_version('openvino')}"
    return f"{versions} {sorted(_NNCF_SETTINGS.items())}"


@functools.cache
def runtime_versions(backend: str) -> str:
    """The libraries that compute ``backend``'s outputs, with their versions ("torch
    2.14.1+cu130; openvino 2026.4.1; nncf 3.4.0"): another version may move a mask or a
    probability, so each row records them beside its backend. NNCF's settings follow its version
    when there are any."""
    parts = [f"torch {torch.__version__}"]
    if backend.startswith("openvino"):
        parts.append(f"openvino {_version('openvino')}")
    if backend == "openvino-int8":
        settings = f" {sorted(_NNCF_SETTINGS.items())}" if _NNCF_SETTINGS else ""
        parts.append(f"nncf {_version('nncf')}{settings}")
    return "; ".join(parts)


def _quantised(onnx_path: Path, calibration: Calibration, network: nn.Module) -> Path:
    """The exported network quantised to int8 by NNCF's post-training quantisation (min-max
    ranges and bias correction over its calibration inputs), saved as OpenVINO IR beside the
    export and cached by the calibration's digest and the quantiser (``_quantiser``)."""
    quantiser = hashlib.sha256(_quantiser().encode()).hexdigest()[:8]
    path = onnx_path.with_name(f"{onnx_path.stem}-int8-{calibration.digest}-q{quantiser}.xml")
    if path.exists():
        return path
    inputs = calibration.inputs().get(network)
    if inputs is None:  # a ROI classifier on images where the segmenter found no lesion
        raise ValueError("int8 needs calibration images, and none reached this network")
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    try:
        import nncf
    except ImportError as error:
        raise ImportError("openvino-int8 needs NNCF: pip install 'skinray[int8]'") from error
    import openvino as ov

    samples = nncf.Dataset([inputs[i : i + 1] for i in range(len(inputs))])
    quantised = nncf.quantize(
        ov.Core().read_model(str(onnx_path)), samples, subset_size=len(inputs), **_NNCF_SETTINGS
    )
    partial = path.with_name(f"{path.stem}.{os.getpid()}.tmp.xml")
    ov.save_model(quantised, str(partial), compress_to_fp16=False)
    # The weights first, then the graph: the .xml existing means both are whole.
    os.replace(partial.with_suffix(".bin"), path.with_suffix(".bin"))
    os.replace(partial, path)
    return path


def read_calibration_images(
    uri: str, input_size: tuple[int, int], count: int = INT8_CALIBRATION_IMAGES
) -> np.ndarray:
    """Up to ``count`` images from ``uri`` (a folder, ``s3://`` prefix or manifest, as the scoring
    job lists its input), spread evenly over its sorted listing, decoded to ``input_size`` as the
    scoring job decodes them: N×H×W×3 uint8. An image that cannot be read or decoded is left out;
    a ``ValueError`` where none is left."""
    from skinray.data.decode import DEFAULT_MAX_PIXELS
    from skinray.score.sources import list_inputs
    from skinray.score.stages import read_and_decode

    listing = list_inputs(uri).sort_by("source_uri")
    picks = np.unique(np.linspace(0, listing.num_rows - 1, min(count, listing.num_rows)).round())
    decoded = read_and_decode(
        listing.take(picks.astype(int)).to_pydict(), tuple(input_size), DEFAULT_MAX_PIXELS
    )
    images = decoded["image"][decoded["error_stage"] == ""]
    if not len(images):
        raise ValueError(f"int8 calibration: no image under {uri} could be read and decoded")
    return images


def network_inputs(predictor, images: np.ndarray | None) -> dict[nn.Module, np.ndarray]:
    """What each network of ``predictor`` sees when it runs eagerly on ``images`` (N×H×W×3 uint8
    at its input size), as int8's calibration inputs: the one prediction path's resizing,
    normalisation and two-step ROI cut, read by forward pre-hooks."""
    if images is None or not len(images):
        return {}
    model = predictor.model
    networks = [model.segmenter, model.classifier] if isinstance(model, TwoStep) else [model]
    seen: dict[nn.Module, list[np.ndarray]] = {network: [] for network in networks}

    def record(module, args):
        seen[module].append(args[0].detach().float().cpu().numpy())

    hooks = [network.register_forward_pre_hook(record) for network in networks]
    try:
        for start in range(0, len(images), 16):
            predictor(torch.from_numpy(np.asarray(images[start : start + 16])).permute(0, 3, 1, 2))
    finally:
        for hook in hooks:
            hook.remove()
    return {network: np.concatenate(batches) for network, batches in seen.items() if batches}


def _output_names(network: nn.Module, input_shape: Sequence[int]) -> list[str]:
    """The output keys of ``network`` for inputs (N, *input_shape): a forward pass on zeros, on
    the network's device."""
    parameter = next(network.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    with torch.no_grad():
        zeros = torch.zeros(2, *(int(s) for s in input_shape), device=device)
        return list(network(zeros).keys())


def _per_network(
    model: nn.Module, input_size, channels: int, convert: Callable[[nn.Module, tuple], nn.Module]
) -> nn.Module:
    """``convert(network, input_shape)`` of the whole model; a two-step composite gets each of its
    two networks converted and keeps its ROI glue in PyTorch (the glue's data-dependent box does
    not export: the exporter fails on it, after seconds of tracing and a dump of the graph)."""
    if not isinstance(model, TwoStep):
        return convert(model, (channels, *input_size))
    composite = copy.copy(model)  # shares buffers and settings; only the two networks change
    composite._modules = dict(model._modules)
    for name, size in (
        ("segmenter", model.segmenter_input_size),
        ("classifier", model.classifier_input_size),
    ):
        setattr(composite, name, convert(getattr(model, name), (3, *size)))
    return composite


class AutocastNetwork(nn.Module):
    """A network run by eager PyTorch under bf16 autocast on its input's device, its outputs in
    float32 as eager's."""

    precision = "bf16"

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast(x.device.type, torch.bfloat16):
            outputs = self.network(x)
        return {name: value.float() for name, value in outputs.items()}


def _autocast(network: nn.Module, input_shape: Sequence[int], every: bool) -> nn.Module:
    """``network`` under bf16 autocast; with ``every`` False, only one without class outputs."""
    if every or "class_logits" not in _output_names(network, input_shape):
        return AutocastNetwork(network)
    return network


# -- choosing -----------------------------------------------------------------------------------------
def accelerated(
    predictor,
    backend: str | None = None,
    *,
    cache_dir: Path | None = None,
    threads: int | None = None,
    calibration_images: np.ndarray | None = None,
):
    """``(predictor on the backend, backend used, reason for a fallback or None)``. ``backend``
    None: the device's default. ``calibration_images`` (N×H×W×3 uint8 at the predictor's input
    size, real images) calibrate ``openvino-int8``. The eager predictor is not changed."""
    device = predictor.device
    calibrated = calibration_images is not None and len(calibration_images) > 0
    backend = backend or default_backend(device, calibrated)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; backends: {', '.join(BACKENDS)}")
    if backend == "eager":
        return predictor, "eager", None
    if predictor.guidance:
        return predictor, "eager", "guidance chains run eager (their stages feed each other)"
    if backend == "openvino-int8" and not calibrated:  # an unreadable calibration URI, say
        following = GUARD_FALLBACK[backend]
        reason = "openvino-int8 needs calibration images (none given, or none could be read)"
        log.warning("%s: running %s", reason, following)
        fast, used, further = accelerated(
            predictor, following, cache_dir=cache_dir, threads=threads
        )
        return fast, used, "; ".join(filter(None, [reason, further]))
    channels = getattr(predictor.model, "input_channels", 3)
    try:
        if backend in _OPENVINO_PRECISION:
            if device.type != "cpu":
                return (
                    predictor,
                    "eager",
                    f"{backend} runs on CPU nodes (GPUs run the eager backends or compile)",
                )
            precision = _OPENVINO_PRECISION[backend]
            calibration = (
                _calibration(predictor, calibration_images) if precision == "int8" else None
            )

            def convert(network, shape):
                return exported_network(network, shape, cache_dir, threads, precision, calibration)

            model = _per_network(predictor.model, predictor.input_size, channels, convert)
        elif backend in _AUTOCAST:
            every = _AUTOCAST[backend] == "all"
            model = _per_network(
                predictor.model,
                predictor.input_size,
                channels,
                lambda network, shape: _autocast(network, shape, every),
            )
        else:
            # dynamic=None: a second batch shape (a short last batch) recompiles once with a
            # dynamic batch dimension instead of once per shape, as dynamic=False did.
            model = torch.compile(predictor.model)
    except Exception as error:
        reason = f"{backend} cannot take {_name(predictor.model)}: {type(error).__name__}: {error}"
        log.warning("falling back to eager: %s", reason)
        return predictor, "eager", reason
    fast = copy.copy(predictor)
    fast.model = model
    if backend == "openvino-int8" and not any(
        getattr(module, "quantised", False) for module in model.modules()
    ):  # a classifier alone, or a joint model: every network has class outputs and runs f32
        reason = (
            f"openvino-int8 quantises only networks without class outputs, and "
            f"{_name(predictor.model)} has none: it runs as openvino (f32)"
        )
        log.info(reason)
        return fast, "openvino", reason
    if backend in ("openvino-bf16", "openvino-mixed") and not any(
        getattr(module, "runs_in", None) == "bf16" for module in model.modules()
    ):  # mixed on a classifier alone; bf16 on a CPU OpenVINO runs no bf16 on
        reason = (
            f"{backend}: OpenVINO runs every network of {_name(predictor.model)} in f32 (a "
            "network with class outputs runs f32 under mixed, and a CPU without AVX-512 or "
            "AVX2-VNNI-2 gets no bf16): it runs as openvino (f32)"
        )
        log.info(reason)
        return fast, "openvino", reason
    if backend == "eager-mixed" and not any(
        isinstance(module, AutocastNetwork) for module in model.modules()
    ):  # a classifier alone, or a joint model: every network has class outputs and runs f32
        reason = (
            f"eager-mixed runs only networks without class outputs in bf16, and "
            f"{_name(predictor.model)} has none: it runs as eager (f32)"
        )
        log.info(reason)
        return predictor, "eager", reason
    return fast, backend, None


def _name(model: nn.Module) -> str:
    return getattr(model, "skinray_model_name", type(model).__name__)


@dataclass(frozen=True)
class GuardResult:
    mask_jaccard: float  # mean per-image Jaccard of the backend's masks against eager's (1: none)
    max_probability_difference: float  # 0 where the model does not classify
    class_agreement: float = 1.0  # share of images whose predicted class is eager's
    max_ood_score_difference: float = 0.0  # 0 where the model has no OOD score
    images: int = 0  # how many were compared

    def combined(self, other: GuardResult) -> GuardResult:
        """The result over both results' images: means weighted by images, the largest of maxima."""
        total = self.images + other.images
        weights = (self.images / total, other.images / total) if total else (0.5, 0.5)

        def mean(name):
            return weights[0] * getattr(self, name) + weights[1] * getattr(other, name)

        return GuardResult(
            mean("mask_jaccard"),
            max(self.max_probability_difference, other.max_probability_difference),
            mean("class_agreement"),
            max(self.max_ood_score_difference, other.max_ood_score_difference),
            total,
        )

    @property
    def passed(self) -> bool:
        """The fp32 bounds, which bf16 is held to as well."""
        return (
            self.mask_jaccard >= MIN_MASK_JACCARD
            and self.max_probability_difference <= MAX_PROBABILITY_DIFFERENCE
            and self.max_ood_score_difference <= MAX_OOD_SCORE_DIFFERENCE
        )

    def passed_for(self, backend: str) -> bool:
        """int8 is judged by the change in its validation figures (docs/benchmarks.md), which no
        batch can show; its guard only catches a broken quantisation: masks and predicted classes
        must hold (``INT8_MIN_MASK_JACCARD``, ``INT8_MIN_CLASS_AGREEMENT``)."""
        if backend != "openvino-int8":
            return self.passed
        return (
            self.mask_jaccard >= INT8_MIN_MASK_JACCARD
            and self.class_agreement >= INT8_MIN_CLASS_AGREEMENT
        )


def compare_predictions(reference, candidate) -> GuardResult:
    """The accuracy guard between two ``Prediction``s of the same images."""
    jaccard = 1.0
    if reference.mask is not None:
        a = reference.mask.bool().cpu().numpy().reshape(len(reference.mask), -1)
        b = candidate.mask.bool().cpu().numpy().reshape(len(candidate.mask), -1)
        union = (a | b).sum(1)
        per_image = np.where(union > 0, (a & b).sum(1) / np.maximum(union, 1), 1.0)
        jaccard = float(per_image.mean())
    difference, agreement = 0.0, 1.0
    if reference.class_probabilities is not None:
        ours, theirs = reference.class_probabilities, candidate.class_probabilities
        difference = float((ours - theirs).abs().max())
        agreement = float((ours.argmax(1) == theirs.argmax(1)).float().mean())
    ood = 0.0
    if reference.ood_score is not None and candidate.ood_score is not None:
        theirs, ours = reference.ood_score, candidate.ood_score
        both_nan = theirs.isnan() & ours.isnan()  # the same verdict: none
        ood = float((theirs - ours).abs().nan_to_num(1.0).masked_fill(both_nan, 0).max())
    shown = reference.mask if reference.mask is not None else reference.class_probabilities
    return GuardResult(jaccard, difference, agreement, ood, len(shown))


class GuardedPredictor:
    """``eager`` on ``backend`` (``accelerated``), held to the accuracy guard: over its first
    ``GUARD_MIN_IMAGES`` images each call runs eager too, and the backend's outputs are returned
    while the guard holds over all the images it has made so far (its largest probability and
    OOD-score differences, its mean mask Jaccard: ``GuardResult.passed_for``), so every output it
    returns was within those bounds. At the first call where they do not hold, or where it raises,
    the backend hands over to its ``GUARD_FALLBACK`` (guarded afresh on the same images), or to
    eager, with the reason logged and kept in ``fallback_reason``. Calls return a ``Prediction``;
    ``backend`` is the one that made it."""

    def __init__(
        self,
        eager,
        backend: str | None = None,
        *,
        threads: int | None = None,
        calibration_images: np.ndarray | None = None,
        min_images: int = GUARD_MIN_IMAGES,
    ) -> None:
        self.eager, self.threads, self.min_images = eager, threads, min_images
        self.predictor, self.backend, self.fallback_reason = accelerated(
            eager, backend, threads=threads, calibration_images=calibration_images
        )
        self.result: GuardResult | None = None  # over the images compared so far

    @property
    def guarding(self) -> bool:
        compared = self.result.images if self.result else 0
        return self.backend != "eager" and compared < self.min_images

    def __call__(self, images):
        if not self.guarding:
            return self.predictor(images)
        reference = self.eager(images)  # where it raises, the next call is guarded instead
        while self.backend != "eager":
            try:  # torch.compile compiles, and may fail, on its first call
                candidate = self.predictor(images)
                result = compare_predictions(reference, candidate)
                so_far = self.result.combined(result) if self.result else result
                failure = None
                if not so_far.passed_for(self.backend):
                    failure = f"failed the accuracy guard ({so_far})"
            except Exception as error:
                failure = f"failed on the guard's images ({type(error).__name__}: {error})"
            if not failure:
                self.result = so_far
                return candidate
            self._fall_back(f"{self.backend} {failure}")
        return reference

    def _fall_back(self, reason: str) -> None:
        self.fallback_reason = "; ".join(filter(None, [self.fallback_reason, reason]))
        log.warning("falling back from %s", reason)
        following = GUARD_FALLBACK.get(self.backend, "eager")
        self.predictor, self.backend, further = accelerated(
            self.eager, following, threads=self.threads
        )
        self.result = None
        if further:
            self.fallback_reason += f"; {further}"
