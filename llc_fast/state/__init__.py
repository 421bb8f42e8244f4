"""Sampler state: the model's sampled parameters as flat buffers (one process) or local FSDP shards, and
the memory they take."""
from .flat import FlatLayout, FlatState, isolated_buffers, swapped_parameters
from .protocol import ChainState

__all__ = ["ChainState", "FlatLayout", "FlatState", "isolated_buffers", "swapped_parameters"]
