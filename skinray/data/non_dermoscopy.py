"""Images that are not dermoscopy, for measuring the out-of-distribution flag (``skinray.ood``).

scikit-image's bundled sample photographs (the ones that ship inside its wheel: no download), and
generated ones: uniform and Gaussian noise, a printed text page, and a chest-X-ray-like grey image
(two dark lung fields, ribs, a bright mediastinum). All RGB uint8.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["SKIMAGE_SAMPLES", "non_dermoscopy_images"]

#: scikit-image samples bundled in its wheel (``skimage.data``), photographs and scientific images.
SKIMAGE_SAMPLES = (
    "astronaut",
    "brick",
    "camera",
    "cat",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "microaneurysms",
    "moon",
    "page",
    "retina",
    "rocket",
    "shepp_logan_phantom",
    "text",
)


def non_dermoscopy_images(seed: int = 0) -> dict[str, np.ndarray]:
    """Name → RGB uint8 image (sizes vary): the scikit-image samples, then the generated ones."""
    import skimage.data

    images = {name: _rgb(getattr(skimage.data, name)()) for name in SKIMAGE_SAMPLES}
    rng = np.random.default_rng(seed)
    for k in range(4):
        images[f"uniform_noise_{k}"] = rng.integers(0, 256, (450, 600, 3), dtype=np.uint8)
    for k in range(2):
        noise = rng.normal(128, 40, (450, 600, 3))
        images[f"gaussian_noise_{k}"] = np.clip(noise, 0, 255).astype(np.uint8)
    images["text_page"] = _text_page()
    images["chest_xray_like"] = _chest_xray_like()
    return images


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    elif image.dtype != np.uint8:
        scaled = (image - image.min()) / max(float(image.max() - image.min()), 1e-12)
        image = (scaled * 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def _text_page() -> np.ndarray:
    page = np.full((800, 600), 245, np.uint8)
    for row, y in enumerate(range(50, 770, 26)):
        line = (
            "Lorem ipsum dolor sit amet, consectetur adipiscing elit" if row % 2 else "0123 ABC xyz"
        )
        cv2.putText(page, line, (30, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 25, 1, cv2.LINE_AA)
    return np.stack([page] * 3, axis=-1)


def _chest_xray_like() -> np.ndarray:
    film = np.full((600, 600), 0.85, np.float32)
    for centre in ((200, 300), (400, 300)):  # lung fields, dark on film
        cv2.ellipse(film, centre, (110, 210), 0, 0, 360, 0.25, -1)
    for y in range(140, 520, 38):  # ribs
        cv2.line(film, (90, y), (510, y + 25), 0.6, 8)
    cv2.rectangle(film, (280, 80), (320, 560), 0.95, -1)  # spine and mediastinum
    film = cv2.GaussianBlur(film, (0, 0), 6)
    return np.stack([(film * 255).astype(np.uint8)] * 3, axis=-1)
