"""Layers with their own params (``fg.nn.linear`` ...); see ferrograd.dsl.nn."""

from .dsl.nn import conv2d, embedding, layer_norm, linear

__all__ = ["conv2d", "embedding", "layer_norm", "linear"]
