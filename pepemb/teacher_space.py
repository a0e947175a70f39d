"""Maps from a student's per-protein embedding space into the teacher's: the affine map fitted by
least squares, and its application to new embeddings.

A `LeastSquaresMap` is two arrays, `weight` [student dim, teacher dim] and `bias` [teacher dim],
so that it can be stored with a checkpoint (np.savez(path, weight=..., bias=...)) and rebuilt as
`LeastSquaresMap(weight, bias)`. Inputs are torch tensors or array-likes; outputs float64 arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pepemb.fidelity import as_float64


def _design(x) -> np.ndarray:
    """[x, 1]: the embeddings with a constant column for the bias."""
    x = as_float64(x)
    return np.hstack([x, np.ones((len(x), 1))])


@dataclass(frozen=True)
class LeastSquaresMap:
    """x -> x @ weight + bias, fitted to minimise the squared error to the teacher's embeddings."""

    weight: np.ndarray  # [student dim, teacher dim]
    bias: np.ndarray  # [teacher dim]

    @classmethod
    def fit(cls, x, y) -> "LeastSquaresMap":
        """The least-squares affine map from x [n, student dim] to y [n, teacher dim] (numpy's
        lstsq on [x, 1]; the minimum-norm solution when x's columns are dependent)."""
        solution = np.linalg.lstsq(_design(x), as_float64(y), rcond=None)[0]
        return cls(weight=solution[:-1], bias=solution[-1])

    def __call__(self, x) -> np.ndarray:
        """New embeddings [m, student dim] in the teacher's space [m, teacher dim]."""
        return _design(x) @ np.vstack([self.weight, self.bias[None]])
