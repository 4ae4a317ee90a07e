import numpy as np
import pytest

from skinray.data.synthetic import synthetic_batch, synthetic_sample


def test_same_seed_gives_identical_sample():
    a, b = synthetic_sample(7, 96), synthetic_sample(7, 96)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.mask, b.mask)
    assert a.label == b.label


def test_different_seeds_give_different_images():
    assert not np.array_equal(synthetic_sample(1, 64).image, synthetic_sample(2, 64).image)


@pytest.mark.parametrize("size", [32, (48, 80), (200, 150)])
def test_shapes_and_dtypes_follow_requested_size(size):
    sample = synthetic_sample(3, size)
    height, width = (size, size) if isinstance(size, int) else size
    assert sample.image.shape == (height, width, 3)
    assert sample.image.dtype == np.uint8
    assert sample.mask.shape == (height, width)
    assert set(np.unique(sample.mask)) == {0, 1}


def test_lesion_is_darker_than_skin_and_covers_a_plausible_area():
    for seed in range(10):
        sample = synthetic_sample(seed, 128, hairs=0)
        brightness = sample.image.astype(float).mean(2)
        inside = brightness[sample.mask == 1].mean()
        outside = brightness[sample.mask == 0].mean()
        assert inside < outside - 20, f"seed {seed}: lesion {inside:.0f} vs skin {outside:.0f}"
        area = sample.mask.mean()
        assert 0.05 < area < 0.5, f"seed {seed}: lesion covers {area:.2f} of the image"


def test_hairs_darken_pixels_without_changing_the_mask():
    bare = synthetic_sample(5, 128, hairs=0)
    hairy = synthetic_sample(5, 128, hairs=6)
    assert np.array_equal(bare.mask, hairy.mask)
    darker = (hairy.image.astype(int).sum(2) < bare.image.astype(int).sum(2) - 60).mean()
    assert darker > 0.005


def test_vignetting_darkens_corners():
    images, masks, _ = synthetic_batch(8, 128, seed=11)
    skin = masks == 0
    brightness = images.astype(float).mean(3)
    corner = np.zeros_like(skin)
    corner[:, :12, :12] = corner[:, -12:, -12:] = True
    centre_ring = np.zeros_like(skin)
    centre_ring[:, 54:74, 4:20] = True  # left middle: skin, away from the corners
    assert brightness[corner & skin].mean() < brightness[centre_ring & skin].mean()


def test_batch_cycles_labels_so_every_class_appears():
    _, _, labels = synthetic_batch(7, 32, num_classes=3)
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_classes_differ_in_lesion_colour():
    images, masks, labels = synthetic_batch(30, 64, num_classes=3)
    mean_colour = np.array([images[i][masks[i] == 1].mean(0) for i in range(len(images))])
    centroids = np.array([mean_colour[labels == c].mean(0) for c in range(3)])
    nearest = np.argmin(((mean_colour[:, None] - centroids[None]) ** 2).sum(2), axis=1)
    assert (nearest == labels).mean() >= 0.9


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="16×16"):
        synthetic_sample(0, 8)
    with pytest.raises(ValueError, match="label 3 outside"):
        synthetic_sample(0, 32, label=3, num_classes=3)
