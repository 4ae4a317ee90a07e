"""skinray: skin-lesion segmentation and classification on dermoscopy images, on Ray."""

__version__ = "0.1.0"


def code_commit() -> str:
    """The git commit of this skinray checkout (short hash), or "unknown" outside a checkout."""
    import subprocess
    from pathlib import Path

    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
