"""Dataset readers: the real layouts, lesion-grouped splits, and clear errors naming the file at fault."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from skinray.data.datasets import (
    HAM10000_CLASSES,
    ISIC2017_CLASSES,
    DatasetError,
    age_band,
    common_holdout,
    group_digest,
    holdout_split,
    read_ham10000,
    read_isic2017,
    read_manifest,
    read_split,
    synthetic_samples,
)
from skinray.data.synthetic import synthetic_sample

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _write_isic_layout(root: Path, ids: list[str], labels: list[tuple[float, float]]) -> None:
    (root / "ISIC-2017_Training_Data").mkdir(parents=True)
    (root / "ISIC-2017_Training_Part1_GroundTruth").mkdir()
    rows = ["image_id,melanoma,seborrheic_keratosis"]
    for i, (image_id, (mel, sk)) in enumerate(zip(ids, labels, strict=True)):
        sample = synthetic_sample(i, 32)
        cv2.imwrite(
            str(root / "ISIC-2017_Training_Data" / f"{image_id}.jpg"), sample.image[..., ::-1]
        )
        cv2.imwrite(
            str(root / "ISIC-2017_Training_Part1_GroundTruth" / f"{image_id}_segmentation.png"),
            sample.mask * 255,
        )
        rows.append(f"{image_id},{mel},{sk}")
    (root / "ISIC-2017_Training_Part3_GroundTruth.csv").write_text("\n".join(rows) + "\n")


def test_isic2017_layout_gives_uris_masks_and_three_classes(tmp_path):
    _write_isic_layout(
        tmp_path, ["ISIC_0000001", "ISIC_0000002", "ISIC_0000003"], [(1, 0), (0, 1), (0, 0)]
    )
    samples = read_isic2017(str(tmp_path))
    assert samples.class_names == ISIC2017_CLASSES
    assert samples.rows["label"].to_pylist() == [0, 1, 2]
    assert samples.rows["mask_uri"][0].as_py().endswith("ISIC_0000001_segmentation.png")


def test_isic2017_image_without_mask_names_the_image(tmp_path):
    _write_isic_layout(tmp_path, ["ISIC_0000001", "ISIC_0000002"], [(0, 0), (0, 0)])
    (tmp_path / "ISIC-2017_Training_Part1_GroundTruth" / "ISIC_0000002_segmentation.png").unlink()
    with pytest.raises(DatasetError, match=r"image without a mask: .*ISIC_0000002\.jpg"):
        read_isic2017(str(tmp_path))


def test_an_isic2017_label_that_is_not_0_or_1_is_refused(tmp_path):
    # A missing melanoma cell (null) read as false, a NaN one as true: the image trained as a
    # nevus or a melanoma, silently.
    _write_isic_layout(tmp_path, ["ISIC_0000001", "ISIC_0000002"], [(0, 0), (float("nan"), 0)])
    with pytest.raises(DatasetError, match="ISIC_0000002 has labels None, 0, not 0 or 1"):
        read_isic2017(str(tmp_path))


def test_missing_dataset_path_is_named(tmp_path):
    with pytest.raises(DatasetError, match=r"dataset root not found: .*nowhere"):
        read_isic2017(str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match=r"dataset root not found: .*nowhere"):
        read_ham10000(str(tmp_path / "nowhere"))


def test_manifest_unknown_label_names_the_file_and_line(tmp_path):
    manifest = tmp_path / "train.csv"
    manifest.write_text(
        "image,mask,label\na.jpg,a.png,nevus\nb.jpg,b.png,melanoma\nc.jpg,c.png,wart\n"
    )
    with pytest.raises(DatasetError, match=r"train\.csv line 4: unknown class label 'wart'"):
        read_manifest(str(manifest), class_names=("melanoma", "nevus"))


def test_manifest_paths_are_relative_to_the_manifest(tmp_path):
    manifest = tmp_path / "sub" / "m.csv"
    manifest.parent.mkdir()
    manifest.write_text("image,mask,label\nimg/a.jpg,masks/a.png,1\n")
    samples = read_manifest(str(manifest))
    assert samples.rows["image_uri"][0].as_py() == f"{manifest.parent}/img/a.jpg"
    assert samples.class_names == ("0", "1")


def test_manifest_without_mask_for_a_segmenter_names_the_image(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,mask,label\na.jpg,a.png,0\nb.jpg,,0\n")
    with pytest.raises(DatasetError, match=r"image without a mask: .*b\.jpg"):
        read_manifest(str(manifest), require_masks=True)


def test_holdout_split_keeps_each_group_on_one_side():
    samples = synthetic_samples(40)
    groups = [f"lesion_{i // 3}" for i in range(40)]  # three images per lesion
    import pyarrow as pa

    grouped = type(samples)(
        samples.rows.set_column(4, "group", pa.array(groups)), samples.class_names
    )
    train, validation = holdout_split(grouped, 0.25, seed=1)
    train_groups = set(train.rows["group"].to_pylist())
    validation_groups = set(validation.rows["group"].to_pylist())
    assert not train_groups & validation_groups
    assert len(train) + len(validation) == 40
    assert round(0.25 * 14) == len(validation_groups)


def test_a_manifest_image_without_a_group_is_a_lesion_of_its_own(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "image,group,label\na.png,L1,x\nb.png,L1,x\nc.png,,y\nd.png,,y\ne.png,007,y\nf.png,7,y\n"
    )
    groups = read_manifest(str(manifest)).rows["group"].to_pylist()
    # Not one lesion of every ungrouped image, and groups are names: 007 is not 7.
    assert groups == ["L1", "L1", f"image:{tmp_path}/c.png", f"image:{tmp_path}/d.png", "007", "7"]


def test_images_of_one_file_name_in_two_folders_are_two_lesions_with_two_cached_masks(tmp_path):
    # Named by file name alone, a/img_001.jpg and b/img_001.jpg were one lesion of the hold-out,
    # and the segmenter's cached mask of one was the other's ROI mask.
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,label\na/img_001.jpg,x\nb/img_001.jpg,y\n")
    rows = read_manifest(str(manifest)).rows
    assert rows["image_id"].to_pylist() == ["img_001", "img_001"]
    assert len(set(rows["group"].to_pylist())) == 2


@pytest.mark.parametrize(("cell", "why"), [("", "no class label"), ("3.0", None)])
def test_a_manifest_label_is_a_name_or_an_index_and_never_empty(tmp_path, cell, why):
    table = pa.table({"image": ["a.png", "b.png"], "label": ["0", cell]})
    if cell == "3.0":  # a float index column, as Parquet writers make one
        table = pa.table({"image": ["a.png", "b.png"], "label": [0.0, 3.0]})
    pq.write_table(table, tmp_path / "m.parquet")
    if why:
        with pytest.raises(DatasetError, match=f"m.parquet row 1: {why}"):
            read_manifest(str(tmp_path / "m.parquet"))
        return
    samples = read_manifest(str(tmp_path / "m.parquet"))
    assert samples.class_names == ("0", "1", "2", "3")
    assert samples.rows["label"].to_pylist() == [0, 3]


def test_models_evaluated_together_share_the_hold_out_one_of_them_drew(tmp_path):
    root = str(tmp_path / "m.csv")
    drawn = {"source": "manifest", "root": root, "fraction": 0.2, "seed": 1}
    named = {**drawn, "groups_sha256": "a" * 64}
    other_data = {**drawn, "source": "ham10000"}
    assert common_holdout({"s": None, "c": drawn}, "manifest", root) == drawn
    assert common_holdout({"s": other_data, "c": None}, "manifest", root) == {}
    assert common_holdout({"s": {**drawn, "root": "/else.csv"}}, "manifest", root) == {}
    # Where one record names the lesions, that one, whose draw is then checked against them.
    assert common_holdout({"s": named, "c": drawn}, "manifest", root) == named
    assert common_holdout({"s": drawn, "c": named}, "manifest", root) == named
    for other in ({**drawn, "seed": 2}, {**named, "groups_sha256": "b" * 64}):
        with pytest.raises(DatasetError, match="s and c drew different hold-outs from manifest"):
            common_holdout({"s": other, "c": named}, "manifest", root)


def test_a_hold_out_is_drawn_again_only_from_the_groups_it_was_drawn_from(tmp_path):
    # The draw permutes the distinct groups: from a manifest with one lesion more, the same
    # fraction and seed would draw another hold-out, of images a model trained on.
    rows = [f"{i}.png,lesion_{i // 2},class_{i % 3}" for i in range(20)]
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(["image,group,label", *rows]) + "\n")
    grown = tmp_path / "grown.csv"
    grown.write_text(manifest.read_text() + "20.png,lesion_99,class_0\n")
    recorded = group_digest(read_manifest(str(manifest)))
    draw = dict(fraction=0.3, seed=2, manifest_holdout=True)

    same = read_split("manifest", str(manifest), **draw, groups_sha256=recorded)
    assert same.rows.equals(read_split("manifest", str(manifest), **draw).rows)
    other = read_split("manifest", str(grown), **draw).rows["image_uri"].to_pylist()
    assert other != same.rows["image_uri"].to_pylist()  # what the check stands between
    with pytest.raises(DatasetError, match=r"grown\.csv: its lesions are not those .* drawn from"):
        read_split("manifest", str(grown), **draw, groups_sha256=recorded)


@pytest.mark.skipif(
    not (SHARED_DATA / "isic2017").exists(), reason="../shared/data/isic2017 absent"
)
def test_real_isic2017_training_and_validation_splits():
    training = read_isic2017(str(SHARED_DATA / "isic2017"), "Training")
    validation = read_isic2017(str(SHARED_DATA / "isic2017"), "Validation")
    assert len(training) == 1808 and len(validation) == 150  # ../shared/data/README.md
    labels = np.array(training.rows["label"].to_pylist())
    assert (labels == 0).sum() == 342 and (labels == 1).sum() == 236


@pytest.mark.skipif(
    not (SHARED_DATA / "ham10000").exists(), reason="../shared/data/ham10000 absent"
)
def test_real_ham10000_lesions_never_straddle_the_split():
    samples = read_ham10000(str(SHARED_DATA / "ham10000"))
    assert len(samples) == 8525 and samples.class_names == HAM10000_CLASSES
    train, validation = holdout_split(samples, 0.15)
    assert not set(train.rows["group"].to_pylist()) & set(validation.rows["group"].to_pylist())
    assert 0.12 < len(validation) / len(samples) < 0.18


def test_real_ham10000_carries_sex_age_band_and_site_with_unknowns_as_null():
    rows = read_ham10000(str(SHARED_DATA / "ham10000")).rows
    sexes = set(rows["sex"].to_pylist())
    assert {"male", "female"} <= sexes and sexes <= {"male", "female", None}  # "unknown" → null
    assert set(rows["age_band"].to_pylist()) <= {"0-29", "30-44", "45-59", "60-74", "75+", None}
    assert "lower extremity" in set(rows["site"].to_pylist())


@pytest.mark.parametrize(
    ("age", "band"), [(0, "0-29"), (29.9, "0-29"), (30, "30-44"), (74, "60-74"), (85, "75+")]
)
def test_age_bands(age, band):
    assert age_band(age) == band
    assert age_band(None) is None and age_band(float("nan")) is None


def test_a_manifest_gives_its_subgroup_columns(tmp_path):
    (tmp_path / "m.csv").write_text(
        "image,label,sex,age,site\na.jpg,0,female,52,back\nb.jpg,1,unknown,,face\n"
    )
    rows = read_manifest(str(tmp_path / "m.csv")).rows
    assert rows["sex"].to_pylist() == ["female", None]
    assert rows["age_band"].to_pylist() == ["45-59", None]
    assert rows["site"].to_pylist() == ["back", "face"]


def test_a_shrunk_truth_mask_stays_centred_on_its_lesion(tmp_path):
    # The image is shrunk by area about its centre; INTER_NEAREST took each block's top-left
    # pixel and put the mask 0.3-0.5 px down and right of the lesion it marks.
    from skinray.data.loading import decode_samples

    yy, xx = np.mgrid[:256, :256]
    lesion = ((yy - 121.3) / 60) ** 2 + ((xx - 133.7) / 45) ** 2 <= 1
    image = np.where(lesion[..., None], 40, 220).astype(np.uint8).repeat(3, axis=2)
    cv2.imwrite(str(tmp_path / "i.png"), image)
    cv2.imwrite(str(tmp_path / "m.png"), lesion.astype(np.uint8) * 255)
    rows = {"image_uri": [str(tmp_path / "i.png")], "mask_uri": [str(tmp_path / "m.png")]}
    decoded = decode_samples({**rows, "label": [0]}, (192, 192), 1)
    # How much of each shrunk pixel is lesion, from its grey level (220 skin, 40 lesion).
    coverage = (220.0 - decoded["image"][0, ..., 0]) / 180.0
    mask = decoded["mask"][0].astype(float)

    def centre(weights):
        ys, xs = np.mgrid[: weights.shape[0], : weights.shape[1]]
        return np.array([(ys * weights).sum(), (xs * weights).sum()]) / weights.sum()

    assert np.abs(centre(mask) - centre(coverage)).max() < 0.25  # 0.40 and 0.41 before


def test_manifest_labels_that_differ_only_in_case_are_refused_not_made_two_classes(tmp_path):
    (tmp_path / "m.csv").write_text("image,label\na.png,mel\nb.png,Mel\nc.png,nv\n")
    with pytest.raises(DatasetError, match="labels 'Mel' and 'mel' differ only in case"):
        read_manifest(str(tmp_path / "m.csv"))


def test_a_random_subset_is_drawn_with_its_seed_and_kept_in_listing_order():
    # ISIC 2017's validation listing, sorted by id, opens with 28 nevi among its first 30 images.
    samples = read_split("isic2017", str(SHARED_DATA / "isic2017"), "validation")
    first = samples.rows["label"].to_pylist()[:30]
    subset = samples.random_subset(30, seed=0)
    ids = subset.rows["image_id"].to_pylist()
    assert ids == sorted(ids) and len(set(ids)) == 30
    assert subset.rows["label"].to_pylist() != first
    assert len(set(subset.rows["label"].to_pylist())) == 3
    assert samples.random_subset(30, seed=0).rows.equals(subset.rows)
    assert not samples.random_subset(30, seed=1).rows.equals(subset.rows)
    assert samples.random_subset(500, seed=0) is samples


def test_an_empty_truth_mask_skips_its_sample_instead_of_failing_the_task(tmp_path):
    # A zero-byte mask raised cv2.error out of decode_samples: the training or evaluation task
    # failed on every retry. (decode_mask's other checks: tests/test_decode.py.)
    from skinray.data.loading import decode_samples

    image = synthetic_sample(3, 64).image
    for name in ("a", "b"):
        cv2.imwrite(str(tmp_path / f"{name}.png"), image)
    cv2.imwrite(str(tmp_path / "a-mask.png"), np.full((64, 64), 255, np.uint8))
    (tmp_path / "b-mask.gif").write_bytes(b"")
    rows = {
        "image_uri": [str(tmp_path / "a.png"), str(tmp_path / "b.png")],
        "mask_uri": [str(tmp_path / "a-mask.png"), str(tmp_path / "b-mask.gif")],
        "label": [0, 0],
    }
    decoded = decode_samples(rows, (32, 32), 1)
    assert decoded["ok"].tolist() == [True, False]
    assert decoded["mask"][0].all()
