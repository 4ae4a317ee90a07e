"""skinray: skin-lesion segmentation and classification on dermoscopy images, on Ray."""

__version__ = "0.1.0"
