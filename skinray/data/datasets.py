"""Readers that turn a labelled dataset (local path or s3://) into a table of samples.

A sample table lists, per image, ``image_uri``, ``mask_uri`` (null where there is none), ``label``
(class index), ``image_id`` and ``group`` (the lesion for HAM10000, so no lesion lands in both train and
validation; the image otherwise). Reading and decoding the pixels happens later, in Ray Data
(:mod:`skinray.data.loading`), so the table is cheap: one directory listing and one CSV per dataset.

Layouts:
- ISIC 2017 challenge: ``ISIC-2017_{Training,Validation}_Data/<id>.jpg``, masks in
  ``…_Part1_GroundTruth/<id>_segmentation.png``, labels in ``…_Part3_GroundTruth.csv`` with
  ``melanoma`` and ``seborrheic_keratosis`` columns (neither: nevus).
- HAM10000: ``images/<id>.jpg``, ``masks/<id>_segmentation.png``, ``HAM10000_metadata.csv`` with
  ``lesion_id, image_id, dx``.
- Manifest: a CSV or Parquet file with ``image``, ``label`` and optionally ``mask``, ``image_id``,
  ``group`` columns; relative paths are relative to the manifest's folder; labels are class names or
  indices.
- Synthetic: ``synthetic:<seed>`` URIs that :mod:`skinray.data.loading` generates on the fly.
"""

from __future__ import annotations

import hashlib
import io as stdio
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from skinray import io

__all__ = [
    "HAM10000_CLASSES",
    "ISIC2017_CLASSES",
    "DatasetError",
    "SampleTable",
    "common_holdout",
    "group_digest",
    "holdout_split",
    "image_set_digest",
    "read_ham10000",
    "read_isic2017",
    "read_manifest",
    "synthetic_samples",
]

ISIC2017_CLASSES = ("melanoma", "seborrheic_keratosis", "nevus")
HAM10000_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
SYNTHETIC_SCHEME = "synthetic:"


class DatasetError(ValueError):
    """A dataset that cannot be read as asked: the message names the file or row at fault."""


@dataclass(frozen=True)
class SampleTable:
    rows: pa.Table
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return self.rows.num_rows

    def take(self, indices) -> SampleTable:
        return SampleTable(self.rows.take(pa.array(indices, type=pa.int64())), self.class_names)

    def random_subset(self, count: int, seed: int) -> SampleTable:
        """``count`` rows drawn with ``seed``, in listing order (all of them where there are no
        more): the first rows of a listing sorted by id are not a sample of it (ISIC 2017's first
        600 training images hold no seborrheic keratosis)."""
        if count < 0:
            raise ValueError(f"a subset of {count} rows")
        if count >= len(self):
            return self
        chosen = np.random.default_rng(seed).permutation(len(self))[:count]
        return self.take(np.sort(chosen))


#: Patient and lesion metadata that evaluation reports subgroups of, where a data set has them.
SUBGROUP_COLUMNS = ("sex", "age_band", "site")
#: Age bands (lower bounds, years) for the ``age_band`` column.
AGE_BANDS = (0, 30, 45, 60, 75)


def age_band(age: float | None) -> str | None:
    """``"45-59"``-style band of an age in years (``"75+"`` for the last); None when unknown."""
    if age is None or age != age or age < 0:
        return None
    lower = max(bound for bound in AGE_BANDS if age >= bound)
    index = AGE_BANDS.index(lower)
    if index == len(AGE_BANDS) - 1:
        return f"{lower}+"
    return f"{lower}-{AGE_BANDS[index + 1] - 1}"


def _known(value) -> str | None:
    """A metadata value, or None for the ways data sets say unknown."""
    if value is None or value != value:
        return None
    text = str(value).strip()
    return None if text.lower() in ("", "unknown", "nan", "none") else text


def _table(
    image_uris, mask_uris, labels, image_ids, groups, class_names, metadata: dict | None = None
) -> SampleTable:
    metadata = metadata or {}
    columns = {
        "image_uri": pa.array(image_uris, pa.string()),
        "mask_uri": pa.array(mask_uris, pa.string()),
        "label": pa.array(labels, pa.int64()),
        "image_id": pa.array(image_ids, pa.string()),
        "group": pa.array(groups, pa.string()),
    }
    for name in SUBGROUP_COLUMNS:
        values = metadata.get(name, [None] * len(image_uris))
        columns[name] = pa.array([_known(v) for v in values], pa.string())
    return SampleTable(pa.table(columns), tuple(class_names))


def _list_names(uri: str) -> set[str]:
    fs, path = io.resolve(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        raise DatasetError(f"dataset folder not found: {uri}")
    return {
        entry.base_name
        for entry in fs.get_file_info(pafs.FileSelector(path))
        if entry.type == pafs.FileType.File
    }


def _read_csv(uri: str) -> pa.Table:
    try:
        data = io.read_bytes(uri)
    except FileNotFoundError:
        raise DatasetError(f"label file not found: {uri}") from None
    try:
        return pacsv.read_csv(stdio.BytesIO(data))
    except pa.ArrowInvalid as error:
        raise DatasetError(f"{uri}: not a readable CSV ({error})") from error


def read_split(
    source: str,
    root: str,
    split: str = "validation",
    *,
    fraction: float = 0.15,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    manifest_holdout: bool = False,
    groups_sha256: str | None = None,
) -> SampleTable:
    """One split of a labelled data set, drawn as training draws it: ISIC 2017's own ``training``
    or ``validation`` folders; HAM10000's lesion-grouped hold-out (``fraction`` and ``seed`` as in
    the recipe: 0.15 and 0 by default); a manifest (``source="manifest"``) whole, or with
    ``manifest_holdout`` its hold-out at ``fraction`` and ``seed`` (for a model whose training
    drew its validation images from this manifest). With ``groups_sha256`` (a model's hold-out
    record), a hold-out is drawn only from the groups the model's was drawn from."""
    split = split.lower()
    if split not in ("training", "validation"):
        raise DatasetError(f"unknown split {split!r}: training or validation")
    if source == "isic2017":
        return read_isic2017(root, split)
    if source == "ham10000":
        samples = read_ham10000(root)
    elif source == "manifest":
        samples = read_manifest(root, tuple(class_names) if class_names else None)
        if not manifest_holdout:
            return samples
    else:
        raise DatasetError(f"unknown data source {source!r}: isic2017, ham10000 or manifest")
    found = group_digest(samples) if groups_sha256 is not None else None
    if found != groups_sha256:
        raise DatasetError(
            f"{root}: its lesions are not those the model's hold-out was drawn from (SHA-256 "
            f"{found[:12]}, recorded {groups_sha256[:12]}): drawn from them, "
            "the hold-out would hold images the model trained on"
        )
    training, validation = holdout_split(samples, fraction, seed)
    return validation if split == "validation" else training


def common_holdout(records: dict[str, dict | None], source: str, root: str) -> dict:
    """The hold-out that models evaluated together drew from ``source`` at ``root``: the one
    record (``config.json``'s ``holdout``, by model) drawn from it (for a manifest, from the same
    manifest), or {} where none was. Models whose records differ are refused: no split is then
    held out from both, and each one's validation images are the other's training images
    (HAM10000 at 0.15: of seed 0's 1,276, 1,071 are on seed 1's training side)."""
    drawn = {model: r for model, r in records.items() if _drawn_from(r, source, root)}
    if len(drawn) > 1:
        (first, a), (second, b) = list(drawn.items())[:2]
        if not _same_draw(a, b):
            raise DatasetError(
                f"{first} and {second} drew different hold-outs from {source} ({_drawn(a)}; "
                f"{_drawn(b)}): each one's validation images are the other's training images"
            )
    # Where only one record names the lesions, that one: its draw is checked against them.
    return max(drawn.values(), key=lambda r: r.get("groups_sha256") is not None, default={})


def _same_draw(a: dict, b: dict) -> bool:
    """The same fraction and seed, from the same lesions where both records name them."""
    lesions = a.get("groups_sha256"), b.get("groups_sha256")
    same_lesions = None in lesions or lesions[0] == lesions[1]
    return same_lesions and (a.get("fraction"), a.get("seed")) == (b.get("fraction"), b.get("seed"))


def _drawn_from(record: dict | None, source: str, root: str) -> bool:
    if not record or record.get("source") != source:
        return False
    return source != "manifest" or record.get("root") == io.absolute(root)


def _drawn(record: dict) -> str:
    lesions = (record.get("groups_sha256") or "not recorded")[:12]
    return f"fraction {record.get('fraction')}, seed {record.get('seed')}, lesions {lesions}"


def image_set_digest(samples: SampleTable) -> str:
    """SHA-256 of the distinct image ids of ``samples``, sorted: the same images under any root."""
    return _sorted_digest(samples.rows["image_id"].to_pylist())


def group_digest(samples: SampleTable) -> str:
    """SHA-256 of the distinct groups (lesions) of ``samples``, sorted. ``holdout_split`` permutes
    them, so from other groups the same fraction and seed draw another hold-out: with one lesion
    fewer in HAM10000, 960 of the 1,266 images drawn would have been in the first draw's training
    side."""
    return _sorted_digest(samples.rows["group"].to_pylist())


def _sorted_digest(values) -> str:
    return hashlib.sha256("\n".join(sorted({str(v) for v in values})).encode()).hexdigest()


def _require_columns(table: pa.Table, columns: tuple[str, ...], uri: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DatasetError(f"{uri}: missing columns {missing}; it has {table.column_names}")


def read_isic2017(root: str, split: str = "Training") -> SampleTable:
    """The ISIC 2017 challenge layout; ``split`` is ``Training`` or ``Validation``."""
    split = split.capitalize()
    if not io.exists(root):
        raise DatasetError(f"dataset root not found: {root}")
    image_dir = io.join(root, f"ISIC-2017_{split}_Data")
    mask_dir = io.join(root, f"ISIC-2017_{split}_Part1_GroundTruth")
    labels_uri = io.join(root, f"ISIC-2017_{split}_Part3_GroundTruth.csv")
    images = sorted(
        n for n in _list_names(image_dir) if n.lower().endswith((".jpg", ".jpeg", ".png"))
    )
    masks = _list_names(mask_dir)
    labels = _read_csv(labels_uri)
    _require_columns(labels, ("image_id", "melanoma", "seborrheic_keratosis"), labels_uri)
    label_of = {}
    for image_id, melanoma, keratosis in zip(
        labels["image_id"].to_pylist(),
        labels["melanoma"].to_pylist(),
        labels["seborrheic_keratosis"].to_pylist(),
        strict=True,
    ):
        if melanoma not in (0, 1) or keratosis not in (0, 1):  # null read as 0, NaN as 1
            raise DatasetError(
                f"{labels_uri}: {image_id} has labels {melanoma!r}, {keratosis!r}, not 0 or 1"
            )
        if melanoma and keratosis:
            raise DatasetError(f"{labels_uri}: {image_id} is labelled both melanoma and SK")
        label_of[image_id] = 0 if melanoma else 1 if keratosis else 2
    rows = ([], [], [], [])
    for name in images:
        image_id = name.rsplit(".", 1)[0]
        if image_id.endswith("_superpixels"):
            continue
        mask_name = f"{image_id}_segmentation.png"
        if mask_name not in masks:
            raise DatasetError(
                f"image without a mask: {io.join(image_dir, name)} (expected "
                f"{io.join(mask_dir, mask_name)})"
            )
        if image_id not in label_of:
            raise DatasetError(
                f"image without a label: {io.join(image_dir, name)} (not in {labels_uri})"
            )
        for column, value in zip(
            rows,
            (io.join(image_dir, name), io.join(mask_dir, mask_name), label_of[image_id], image_id),
            strict=True,
        ):
            column.append(value)
    if not rows[0]:
        raise DatasetError(f"no images in {image_dir}")
    return _table(*rows, rows[3], ISIC2017_CLASSES)


def read_ham10000(root: str) -> SampleTable:
    """HAM10000 images, masks and the 7 ``dx`` classes; ``group`` is the ``lesion_id``; ``sex``,
    ``age_band`` and ``site`` (``localization``) from the metadata."""
    if not io.exists(root):
        raise DatasetError(f"dataset root not found: {root}")
    metadata_uri = io.join(root, "HAM10000_metadata.csv")
    metadata = _read_csv(metadata_uri)
    _require_columns(metadata, ("lesion_id", "image_id", "dx"), metadata_uri)
    images = _list_names(io.join(root, "images"))
    masks = _list_names(io.join(root, "masks"))
    rows = ([], [], [], [], [])
    for line, (lesion_id, image_id, dx) in enumerate(
        zip(
            metadata["lesion_id"].to_pylist(),
            metadata["image_id"].to_pylist(),
            metadata["dx"].to_pylist(),
            strict=True,
        ),
        start=2,
    ):
        if dx not in HAM10000_CLASSES:
            raise DatasetError(
                f"{metadata_uri} line {line}: unknown class {dx!r} for {image_id}; "
                f"known: {', '.join(HAM10000_CLASSES)}"
            )
        image_uri = io.join(root, "images", f"{image_id}.jpg")
        if f"{image_id}.jpg" not in images:
            raise DatasetError(f"{metadata_uri} line {line}: image not found: {image_uri}")
        if f"{image_id}_segmentation.png" not in masks:
            raise DatasetError(f"image without a mask: {image_uri}")
        for column, value in zip(
            rows,
            (
                image_uri,
                io.join(root, "masks", f"{image_id}_segmentation.png"),
                HAM10000_CLASSES.index(dx),
                image_id,
                lesion_id,
            ),
            strict=True,
        ):
            column.append(value)
    columns = metadata.column_names
    subgroups = {
        "sex": metadata["sex"].to_pylist() if "sex" in columns else None,
        "age_band": [age_band(a) for a in metadata["age"].to_pylist()]
        if "age" in columns
        else None,
        "site": metadata["localization"].to_pylist() if "localization" in columns else None,
    }
    return _table(*rows, HAM10000_CLASSES, {k: v for k, v in subgroups.items() if v is not None})


def read_manifest(
    uri: str, class_names: tuple[str, ...] | None = None, require_masks: bool = False
) -> SampleTable:
    """A CSV or Parquet manifest with ``image``, ``label`` and optional ``mask`` columns."""
    if uri.endswith(".parquet"):
        try:
            fs, path = io.resolve(uri)
            table = pq.read_table(path, filesystem=fs)
        except FileNotFoundError:
            raise DatasetError(f"manifest not found: {uri}") from None
    else:
        try:
            data = io.read_bytes(uri)
        except FileNotFoundError:
            raise DatasetError(f"manifest not found: {uri}") from None
        table = pacsv.read_csv(
            stdio.BytesIO(data),
            convert_options=pacsv.ConvertOptions(
                # Names, not numbers: read as numbers, groups "007" and "7" would be one lesion.
                column_types={
                    name: pa.string() for name in ("label", "image", "mask", "image_id", "group")
                }
            ),
        )
    _require_columns(table, ("image", "label"), uri)

    def absolute(path: str | None) -> str | None:
        if path is None or path == "":
            return None
        return path if path.startswith(SYNTHETIC_SCHEME) else io.in_manifest(uri, path)

    raw_labels = [_label_text(v, uri, row) for row, v in enumerate(table["label"].to_pylist())]
    if class_names is None:
        if all(v.isdigit() for v in raw_labels):
            class_names = tuple(str(i) for i in range(max(int(v) for v in raw_labels) + 1))
        else:
            class_names = tuple(sorted(set(raw_labels)))
            _one_spelling_per_class(class_names, uri)
    labels = []
    for row, value in enumerate(raw_labels, start=2 if not uri.endswith(".parquet") else 0):
        if value in class_names:
            labels.append(class_names.index(value))
        elif value.isdigit() and int(value) < len(class_names):
            labels.append(int(value))
        else:
            where = f"line {row}" if not uri.endswith(".parquet") else f"row {row}"
            raise DatasetError(
                f"{uri} {where}: unknown class label {value!r}; known: {', '.join(class_names)}"
            )
    images = [absolute(p) for p in table["image"].to_pylist()]
    masks = (
        [absolute(p) for p in table["mask"].to_pylist()]
        if "mask" in table.column_names
        else [None] * len(images)
    )
    if require_masks:
        for row, (image, mask) in enumerate(zip(images, masks, strict=True)):
            if mask is None:
                raise DatasetError(f"{uri}: image without a mask: {image} (row {row})")
    image_ids = (
        [str(v) for v in table["image_id"].to_pylist()]
        if "image_id" in table.column_names
        else [p.rsplit("/", 1)[-1].rsplit(".", 1)[0] for p in images]
    )
    # An image with no group is a lesion of its own, whatever groups are named, and whatever
    # its file name: two folders may each hold an img_001.jpg.
    groups = (
        [
            str(g) if g not in (None, "") else f"image:{u}"
            for g, u in zip(table["group"].to_pylist(), images, strict=True)
        ]
        if "group" in table.column_names
        else [f"image:{u}" for u in images]
    )
    return _table(images, masks, labels, image_ids, groups, class_names, _manifest_metadata(table))


def _one_spelling_per_class(names: tuple[str, ...], uri: str) -> None:
    """Labels that differ only in case or spaces ("mel", "Mel ") would each become a class."""
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(name.strip().casefold(), name)
        if other != name:
            raise DatasetError(
                f"{uri}: labels {other!r} and {name!r} differ only in case or spaces; write one "
                "spelling, or give the class names"
            )


def _label_text(value, uri: str, row: int) -> str:
    """A manifest's label as text: a class name, or an index (a float one from Parquet, 3.0, as
    3). An empty label is refused: as a class of its own it would train as one."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if value is None or str(value).strip() == "":
        where = f"row {row}" if uri.endswith(".parquet") else f"line {row + 2}"
        raise DatasetError(f"{uri} {where}: no class label")
    return str(value)


def _manifest_metadata(table: pa.Table) -> dict[str, list]:
    """Optional ``sex``, ``age`` (years) or ``age_band``, and ``site`` columns of a manifest."""
    names, metadata = table.column_names, {}
    if "sex" in names:
        metadata["sex"] = table["sex"].to_pylist()
    if "age_band" in names:
        metadata["age_band"] = table["age_band"].to_pylist()
    elif "age" in names:
        ages = pc.cast(table["age"], pa.float64(), safe=False).to_pylist()
        metadata["age_band"] = [age_band(a) for a in ages]
    if "site" in names:
        metadata["site"] = table["site"].to_pylist()
    return metadata


def synthetic_samples(count: int, num_classes: int = 3, seed: int = 0) -> SampleTable:
    """``count`` synthetic samples (generated on decode, so nothing is written anywhere)."""
    uris = [f"{SYNTHETIC_SCHEME}{seed + i}" for i in range(count)]
    names = tuple(f"class_{c}" for c in range(num_classes))
    labels = [i % num_classes for i in range(count)]
    ids = [f"synthetic_{seed + i:06d}" for i in range(count)]
    return _table(uris, uris, labels, ids, ids, names)


def holdout_split(
    samples: SampleTable, fraction: float, seed: int = 0
) -> tuple[SampleTable, SampleTable]:
    """Split by ``group`` (lesion) so no group is on both sides; ``fraction`` of groups to validation."""
    groups = np.array(samples.rows["group"].to_pylist())
    unique = np.unique(groups)
    rng = np.random.default_rng(seed)
    held = set(rng.permutation(unique)[: max(1, round(fraction * len(unique)))])
    is_validation = np.array([g in held for g in groups])
    return samples.take(np.flatnonzero(~is_validation)), samples.take(np.flatnonzero(is_validation))
