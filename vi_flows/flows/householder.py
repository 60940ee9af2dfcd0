"""Householder flows (Tomczak & Welling, 2016)."""

import math

import torch
from torch import nn

from .base import FlowTransform


def householder_product(vectors):
    r"""Return :math:`H_K \cdots H_1` for reflections :math:`H_k = I - 2 v_k v_k^\top / \|v_k\|^2`.

    ``vectors`` has shape ``(..., K, D)``; the result has shape ``(..., D, D)``.
    """
    dim = vectors.shape[-1]
    units = vectors / vectors.norm(dim=-1, keepdim=True)
    product = torch.eye(dim, dtype=vectors.dtype, device=vectors.device).expand(vectors.shape[:-2] + (dim, dim))
    for k in range(vectors.shape[-2]):
        v = units[..., k, :]
        product = product - 2 * v.unsqueeze(-1) * (v.unsqueeze(-2) @ product)
    return product


class Householder(FlowTransform):
    r"""A product of ``num_layers`` Householder reflections.

    .. math:: z' = H_K \cdots H_1 z, \qquad H_k = I - 2\frac{v_k v_k^\top}{\|v_k\|^2},
              \qquad \log|\det J| = 0.

    The flow is volume-preserving: it rotates (and reflects) its base distribution, so it needs a
    base with a learnable scale to change the shape of a distribution. Its inverse is the
    transposed product.

    Tomczak & Welling, "Improving Variational Auto-Encoders using Householder Flow", 2016.

    Example::

        >>> flow = Householder(dim=4, num_layers=3)
        >>> z = torch.randn(2, 4)
        >>> torch.allclose(flow(z).norm(dim=-1), z.norm(dim=-1))
        True
    """

    def __init__(self, dim, num_layers=1):
        super().__init__(dim, num_layers)
        self.sign = (-1) ** self.num_layers  # each reflection has determinant -1
        bound = 1 / math.sqrt(dim)
        self.vectors = nn.Parameter(torch.empty(num_layers, dim).uniform_(-bound, bound))

    def _reflect(self, x, order):
        # Reflecting the samples directly costs K (N x D) products, less than forming the D x D
        # product matrix first whenever N < D, which is the usual case in SVI (N = particles).
        units = self.vectors / self.vectors.norm(dim=-1, keepdim=True)
        for k in order:
            x = x - 2 * (x @ units[k]).unsqueeze(-1) * units[k]
        return x

    def forward_and_log_det(self, x):
        return self._reflect(x, range(self.num_layers)), x.new_zeros(x.shape[:-1])

    def forward_and_score(self, x, score):
        # Orthogonal and volume-preserving: J^-T = J, so the score turns with the points.
        return self._reflect(x, range(self.num_layers)), self._reflect(score, range(self.num_layers))

    def _inverse(self, y):
        return self._reflect(y, reversed(range(self.num_layers)))
