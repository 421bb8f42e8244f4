"""Sampler state: the model's sampled parameters as flat buffers, and the views that bind them."""
from .flat import FlatLayout, FlatState, isolated_buffers, swapped_parameters

__all__ = ["FlatLayout", "FlatState", "isolated_buffers", "swapped_parameters"]
