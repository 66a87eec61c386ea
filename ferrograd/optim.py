"""Optimizers (``fg.optim.SGD``, ``Adam``, ``AdamW``, ``RMSprop``); see ferrograd.ir.optim."""

from .ir.optim import SGD, Adam, AdamW, Optimizer, RMSprop

__all__ = ["SGD", "Adam", "AdamW", "Optimizer", "RMSprop"]
