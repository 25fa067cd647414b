"""The teacher's uncertainty, defined once: entropy H of softmax(logits / tau) and the confidence weight
w = 1 - H / log C (the paper's). numpy here, in float64 (the teacher cache, the report); the torch twin is
trainer.engine.losses.entropy (float32, on the device) and uses `confidence_weight` from here, so the formula has
one home. tests/test_one_home.py checks that the two entropies agree.
"""
from __future__ import annotations

import math
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def entropy(logits: np.ndarray, tau: float = 1.0) -> np.ndarray:
    """Entropy (nats) of softmax(logits / tau) per row, in float64."""
    logp = log_softmax(np.asarray(logits, dtype=np.float64) / tau)
    return -(np.exp(logp) * logp).sum(axis=1)


def confidence_weight(entropy: T, num_classes: int) -> T:
    """w = 1 - H / log C, in [0, 1]: 1 for a one-hot teacher, 0 for a uniform one. Any array type (numpy, torch)."""
    return 1.0 - entropy / math.log(num_classes)
