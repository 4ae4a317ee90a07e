"""Nightly scoring of image archives on Ray Data."""
