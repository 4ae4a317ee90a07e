"""Datasets, decoding, transforms and synthetic images."""
