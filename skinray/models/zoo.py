"""Released models, shipped inside the package and loaded by a short name.

Each lives in the repository's ``models/<name>/`` (``$SKINRAY_MODELS`` points elsewhere, e.g. for an
install that is not an editable checkout): ``model.safetensors`` (fp16), ``config.json`` and
``MODEL_CARD.md`` (data, recipe, commit, metrics with confidence intervals, calibration, intended use
and licence). ``load_model("lesion-segmenter")`` finds them; a path or s3:// URI is used as given.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

__all__ = [
    "DEFAULT_CLASSIFIER",
    "DEFAULT_SEGMENTER",
    "example_archive",
    "released_models",
    "resolve_model",
    "zoo_root",
]

#: What ``jobs/score.py`` scores with when no model is given.
DEFAULT_SEGMENTER = "lesion-segmenter"
DEFAULT_CLASSIFIER = "ham10000-classifier"


def zoo_root() -> Path:
    override = os.environ.get("SKINRAY_MODELS")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "models"


def example_archive() -> str:
    """The 8 CC0 ISIC Archive images shipped as ``jobs/score.py``'s default input."""
    return str(resources.files("skinray") / "examples" / "isic_archive" / "images")


def released_models() -> list[str]:
    """Names of the released models in this install."""
    root = zoo_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


def resolve_model(uri: str | os.PathLike) -> str:
    """A released model's short name → its directory; anything else unchanged."""
    text = os.fspath(uri)
    if "/" in text or "\\" in text or text.startswith("s3:"):
        return text
    candidate = zoo_root() / text
    if (candidate / "config.json").is_file() and not Path(text).exists():
        return str(candidate)
    return text
