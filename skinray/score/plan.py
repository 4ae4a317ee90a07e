"""The scoring run's plan, settled before any image is read: the models and what they take, where
the model stages run, and how much object store the run may hold.

Each model runs on an actor pool (one GPU per actor where the cluster has or may grow GPUs, CPU
actors otherwise) that Ray restarts if an actor dies, retrying its batches. A pool may grow to what
the cluster may grow to (its autoscaler's node types at their maximum counts), not only to what is
up when the run starts, so an autoscaling cluster whose workers start from zero is asked for nodes.
The run's object store is bounded by the pool, not the archive: decoded images wait for the models
only ``prefetch_batches`` batches per actor deep (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from skinray.score.config import ScoreConfig, ScoreConfigError

__all__ = [
    "IDLE_WORKERS_PER_CPU",
    "LIGHT_TASK_CPUS",
    "OUTPUT_ROW_BYTES",
    "WRITE_TASK_CPUS",
    "ClusterShape",
    "Placement",
    "ScoringModels",
    "cluster_shape",
    "object_store_budget",
    "plan_placement",
    "ray_node_environment",
    "read_scoring_models",
]

#: CPUs claimed by the descriptor and row-building tasks: milliseconds an image, they must not wait for a
#: whole free CPU behind the decode tasks (on 2 CPUs, 440 images: 45.0 s at 0.25, 49.2 s at 1).
LIGHT_TASK_CPUS = 0.25
#: CPUs claimed by a staging-write task. It differs from ``LIGHT_TASK_CPUS`` on purpose: Ray Data
#: fuses map stages with equal remote args into the write, and a fused write bundles its
#: ``min_rows_per_file`` rows *before* the fused stages run, so image+mask batches, not finished rows,
#: queued under the object-store bound until 1,024 had arrived and the model actor stalled (440
#: images: predict busy 58.9 s of a 301.9 s span, 1.36 images/s).
WRITE_TASK_CPUS = 0.2
#: Idle worker processes a node keeps, per CPU (Ray's ``num_workers_soft_limit``; cluster.yaml
#: sets it on every worker node). The stages claim fractions of a CPU (the CPU model actor 0.5, the
#: light and write tasks ``LIGHT_TASK_CPUS`` and ``WRITE_TASK_CPUS``), so a node runs more tasks at
#: once than it has CPUs. Ray's default keeps idle workers only up to the CPUs left free and kills
#: the rest after 1 s, and each replacement starts Python and imports its stage's modules again: 15
#: new worker processes in a 72 s run over 4,400 images on 2 CPUs. Keeping one for each task that
#: can run at once: 75.2 and 75.7 s → 64.2 and 61.9 s (docs/benchmarks.md).
IDLE_WORKERS_PER_CPU = math.ceil(1 / min(LIGHT_TASK_CPUS, WRITE_TASK_CPUS))


def ray_node_environment(node_cpus: int) -> dict[str, str]:
    """The ``RAY_*`` settings of a node that runs scoring stages, read by the raylet ``ray start``
    or a local ``ray.init()`` starts: cluster.yaml sets them on its worker nodes, and
    ``run_scoring`` for the local Ray it starts when there is no cluster."""
    return {"RAY_num_workers_soft_limit": str(IDLE_WORKERS_PER_CPU * max(1, node_cpus))}


#: Bytes of a finished output row in the object store, for the write's bundle: its mask PNG (under
#: 2 KiB at 192 px for most lesions) and ~60 numbers and strings, rounded up.
OUTPUT_ROW_BYTES = 4096


@dataclass(frozen=True)
class ScoringModels:
    """The run's models as their configs describe them.

    ``identity`` holds the model names, weight hashes and config hashes every row records
    (``segmenter``, ``segmenter_sha256``, ``segmenter_config_sha256`` and the classifier's three,
    None without one); ``input_size`` is what images are decoded to for the ``Predictor``: the model's input
    size, or for a two-step pair the size its classifier's ROIs are cut from."""

    identity: dict[str, str | None]
    class_names: list[str]
    input_size: tuple[int, int]


def read_scoring_models(config: ScoreConfig) -> ScoringModels:
    """The configs of ``config``'s segmenter and classifier, checked for the roles scoring gives
    them, and each model loaded once, before any Ray work (``skinray.predict.check_models``)."""
    from skinray.predict import ModelCheckError, check_models, pair_input_size

    try:
        configs = check_models(config.segmenter, config.classifier)
    except ModelCheckError as error:
        raise ScoreConfigError(str(error)) from None
    segmenter, classifier = configs[0], (configs[1] if config.classifier else None)
    identity = {
        "segmenter": segmenter.model,
        "segmenter_sha256": segmenter.weights_sha256,
        "segmenter_config_sha256": segmenter.config_sha256,
        "classifier": classifier.model if classifier else None,
        "classifier_sha256": classifier.weights_sha256 if classifier else None,
        "classifier_config_sha256": classifier.config_sha256 if classifier else None,
    }
    source = classifier or segmenter
    # A segmenter alone gives masks and descriptors; its rows have no diagnosis.
    class_names = list(source.class_names or ()) if "class_logits" in source.outputs else []
    input_size = pair_input_size(segmenter, classifier) if classifier else segmenter.input_size
    return ScoringModels(identity, class_names, tuple(input_size))


@dataclass(frozen=True)
class Placement:
    """Where the model stages run: actors per stage, a GPU each or CPU threads each."""

    use_gpu: bool
    max_actors: int
    cpu_threads: int
    decode_slots: int

    def pool_args(self, config: ScoreConfig) -> dict:
        """map_batches arguments for a model stage."""
        import ray

        return dict(
            compute=ray.data.ActorPoolStrategy(
                min_size=min(config.min_actors, self.max_actors), max_size=self.max_actors
            ),
            num_gpus=1 if self.use_gpu else 0,
            # On CPU a model actor claims half a CPU so that both model stages and the decode
            # tasks get scheduled on a small node; its torch threads are set apart (Ray would set
            # OMP_NUM_THREADS to 1 from this). Ray Data restarts a dead actor and retries its
            # batches (max_restarts=-1).
            num_cpus=1 if self.use_gpu else 0.5,
        )


@dataclass(frozen=True)
class ClusterShape:
    """What the cluster holds now and what it may grow to: its largest node's CPUs and, where
    Ray's autoscaler reports its node types, the CPUs and GPUs of every type at its
    ``max_workers`` (the ceiling); on a cluster that cannot grow the ceiling is what is present."""

    cpus: int
    gpus: int
    node_cpus: int
    max_cpus: int
    max_gpus: int

    @property
    def autoscales(self) -> bool:
        return self.max_cpus > self.cpus or self.max_gpus > self.gpus


def cluster_shape() -> ClusterShape:
    """The connected cluster's :class:`ClusterShape`: present resources from ``ray``; the ceiling
    from the autoscaler's config (``_autoscaler_ceiling``), where there is one."""
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    node_cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]]
    ceiling, type_cpus = _autoscaler_ceiling()
    return ClusterShape(
        cpus=cpus,
        gpus=gpus,
        node_cpus=max([*node_cpus, *type_cpus, 1]),
        max_cpus=max(cpus, int(ceiling.get("CPU", 0))),
        max_gpus=max(gpus, int(ceiling.get("GPU", 0))),
    )


#: Where ``ray up`` leaves the cluster config on the head for the autoscaler (v1 reads it there;
#: only autoscaler v2 also reports it to the GCS). ``ray job submit`` runs drivers on the head.
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


def _autoscaler_ceiling() -> tuple[dict[str, int], list[int]]:
    """The most CPUs and GPUs the autoscaler may start, and the CPUs of its worker node types: from
    the cluster config the autoscaler reported to the GCS (v2), else from the bootstrap config on
    the head (v1); empty where neither is found."""
    try:  # a private API, read as Ray Data's hash shuffle reads it; absent or changed: no ceiling
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:
        config = None
    if config is not None and config.node_group_configs:
        types = [(g.max_count, dict(g.resources)) for g in config.node_group_configs if g.max_count]
        limit = dict(config.max_resources)
    else:
        types, limit = _bootstrap_node_types(Path(BOOTSTRAP_CONFIG).expanduser())
    ceiling = {
        key: min(_most(types, key, limit.get("max_workers")), limit.get(key, 2**31))
        for key in ("CPU", "GPU")
    }
    return ceiling, [int(resources.get("CPU", 0)) for _, resources in types]


def _bootstrap_node_types(path: Path) -> tuple[list[tuple[int, dict]], dict]:
    """(max count, resources) of each worker node type in a ``ray up`` cluster config, and the
    cluster's ``max_workers`` (its budget of worker nodes over all types)."""
    if not path.is_file():
        return [], {}
    import yaml

    config = yaml.safe_load(path.read_text()) or {}
    head = config.get("head_node_type")
    types = [
        (int(spec.get("max_workers", config.get("max_workers", 0))), spec.get("resources") or {})
        for name, spec in (config.get("available_node_types") or {}).items()
        if name != head
    ]
    budget = config.get("max_workers")
    return [t for t in types if t[0] > 0], ({"max_workers": int(budget)} if budget else {})


def _most(types: list[tuple[int, dict]], key: str, node_budget: int | None) -> int:
    """The most of resource ``key`` that ``node_budget`` worker nodes of ``types`` may hold: the
    richest types first, each up to its own maximum count."""
    total, nodes_left = 0, node_budget if node_budget is not None else 2**31
    for count, resources in sorted(types, key=lambda t: -float(t[1].get(key, 0))):
        taken = min(count, nodes_left)
        total += taken * int(resources.get(key, 0))
        nodes_left -= taken
    return total


def plan_placement(config: ScoreConfig, shape: ClusterShape | None = None) -> Placement:
    """The placement for the connected Ray cluster (``shape``: :func:`cluster_shape`).

    GPU actors where the cluster has GPUs or may grow GPU nodes (unless ``config.use_gpu`` says
    otherwise), one a GPU; CPU actors otherwise, one per 4 CPUs. Pools are sized by the
    cluster's ceiling, not by what is up when the run starts: on an autoscaling cluster whose
    workers start from zero, Ray Data adds actors while their queue is backed up and asks the
    autoscaler for the nodes to hold them. ``config.max_actors`` caps each pool; torch threads
    are shared out among the actors a node may hold."""
    shape = shape or cluster_shape()
    use_gpu = config.use_gpu if config.use_gpu is not None else shape.max_gpus > 0
    ceiling = max(1, shape.max_gpus) if use_gpu else max(1, shape.max_cpus // 4)
    upper = config.max_actors or ceiling
    nodes = max(1, round(shape.max_cpus / max(shape.node_cpus, 1)))
    per_node = -(-upper // nodes)
    threads = config.cpu_threads_per_actor or max(1, shape.node_cpus // per_node)
    return Placement(use_gpu, upper, threads, decode_slots=max(1, shape.max_cpus))


def object_store_budget(
    config: ScoreConfig,
    placement: Placement,
    input_size: tuple[int, int],
    mean_source_bytes: float = 0.0,
) -> int:
    """Bytes of object store the run may hold: ``prefetch_batches`` batches queued for every
    model actor, each counted twice (the decoded images waiting for the actor, and its output rows,
    image and mask, waiting for the descriptor stage), and one output per decode task. A bound that
    depends on the pool, not on the archive, keeps memory flat however many images there are.
    Counting the queue once starved the actor (110 images: predict span 58.5 s for 18.4 s of work,
    against 17.8 s with the outputs counted). Where the actor decodes the JPEGs, their bytes
    (``mean_source_bytes`` a file) queue for it too, and a file's worth of finished rows waits for
    each write task (``rows_per_file``)."""
    if config.object_store_memory_mib:
        return int(config.object_store_memory_mib * 2**20)
    row = 4 * input_size[0] * input_size[1]  # RGB + mask, uint8
    queued_row = 2 * row + (int(mean_source_bytes) if config.jpeg_decode_in_segmenter else 0)
    queued = config.prefetch_batches * config.batch_size * queued_row
    decoding = placement.decode_slots * config.decode_batch_size * row
    writing = config.rows_per_file * OUTPUT_ROW_BYTES  # a file's worth of finished rows
    return queued * placement.max_actors + decoding + writing
