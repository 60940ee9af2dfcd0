"""Sylvester flows (van den Berg, Hasenclever, Tomczak & Welling, 2018)."""

import math

import torch
from torch import nn

from .base import NEAR_IDENTITY, FlowTransform, solve_monotone
from .householder import householder_product


def _row_maps(q, r, r_tilde):
    """The input map ``Q R~^T`` and output map ``(Q R)^T`` of row vectors, per layer."""
    return q @ r_tilde.transpose(-1, -2), (q @ r).transpose(-1, -2)


class _Sylvester(FlowTransform):
    r"""Shared body of the three Sylvester variants; subclasses say how ``Q`` is made.

    For a row vector :math:`z` each layer computes :math:`z' = z + \tanh(z Q \tilde R^\top + b)\,(QR)^\top`,
    the column-vector map :math:`z + QR\,h(\tilde R Q^\top z + b)` of the paper.
    """

    def __init__(self, dim, num_layers, bottleneck):
        super().__init__(dim, num_layers)
        if not 1 <= bottleneck <= dim:
            raise ValueError(f"Sylvester bottleneck must lie in [1, dim={dim}], got {bottleneck}")
        self.bottleneck = int(bottleneck)
        bound = 1 / math.sqrt(bottleneck)
        shape = (num_layers, bottleneck, bottleneck)
        # A small output map R starts every layer near the identity.
        self.r = nn.Parameter(torch.empty(shape).uniform_(-NEAR_IDENTITY * bound, NEAR_IDENTITY * bound))
        self.r_tilde = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
        self.r_diag_raw = nn.Parameter(torch.empty(num_layers, bottleneck).uniform_(-NEAR_IDENTITY, NEAR_IDENTITY))
        self.r_tilde_diag_raw = nn.Parameter(torch.empty(num_layers, bottleneck).uniform_(-1, 1))
        self.bias = nn.Parameter(torch.empty(num_layers, bottleneck).uniform_(-bound, bound))
        self.register_buffer("_strict_upper", torch.ones(bottleneck, bottleneck).triu(1), persistent=False)

    def orthonormal_bases(self):
        """Return ``Q`` for every layer, shape ``(num_layers, dim, bottleneck)``, orthonormal columns."""
        raise NotImplementedError

    def _layer_maps(self):
        """Return ``Q``, the triangular ``R`` and ``R~`` (diagonals in (-1, 1)) and their diagonals' products."""
        # tanh keeps every diagonal in (-1, 1), so r_ii * r~_ii > -1 >= -1 / max tanh': invertible.
        r_diag = torch.tanh(self.r_diag_raw)
        r_tilde_diag = torch.tanh(self.r_tilde_diag_raw)
        r = self.r * self._strict_upper + torch.diag_embed(r_diag)
        r_tilde = self.r_tilde * self._strict_upper + torch.diag_embed(r_tilde_diag)
        q = self.orthonormal_bases()
        return q, r, r_tilde, r_diag * r_tilde_diag

    def forward_and_log_det(self, x):
        q, r, r_tilde, diag_products = self._layer_maps()
        maps_in, maps_out = _row_maps(q, r, r_tilde)
        log_det = x.new_zeros(x.shape[:-1])
        for k in range(self.num_layers):
            activation = torch.tanh(x @ maps_in[k] + self.bias[k])
            x = x + activation @ maps_out[k]
            log_det = log_det + torch.log1p((1 - activation.pow(2)) * diag_products[k]).sum(-1)
        return x, log_det

    def forward_and_score(self, x, score):
        # J^T = I + Q M Q^T with M = R~^T diag(h') R^T, lower triangular M x M; as Q^T Q = I,
        # Woodbury's identity gives J^-T v = v - Q (I + M)^-1 M Q^T v: one triangular solve of size M.
        q, r, r_tilde, diag_products = self._layer_maps()
        maps_in, maps_out = _row_maps(q, r, r_tilde)
        identity = torch.eye(self.bottleneck, dtype=x.dtype, device=x.device)
        for k in range(self.num_layers):
            activation = torch.tanh(x @ maps_in[k] + self.bias[k])
            slope = 1 - activation.pow(2)
            # the gradient of log|det J| = sum log(1 + h'_i R_ii R~_ii), with h'' = -2 h h'
            log_det_slope = -2 * activation * slope * diag_products[k] / (1 + slope * diag_products[k])
            score = score - log_det_slope @ maps_in[k].transpose(-1, -2)
            middle = r_tilde[k].transpose(-1, -2) * slope.unsqueeze(-2) @ r[k].transpose(-1, -2)
            projected = middle @ (score @ q[k]).unsqueeze(-1)
            solved = torch.linalg.solve_triangular(identity + middle, projected, upper=False).squeeze(-1)
            score = score - solved @ q[k].transpose(-1, -2)
            x = x + activation @ maps_out[k]
        return x, score

    def _inverse(self, y):
        # Q^T z' = u + R tanh(R~ u + b) with u = Q^T z is upper triangular in u: solve it from the
        # last coordinate up, each step an increasing scalar equation; the part of z orthogonal
        # to Q's columns is left unchanged by the layer.
        q, r, r_tilde, _ = self._layer_maps()
        for k in reversed(range(self.num_layers)):
            projected = y @ q[k]
            u = torch.zeros_like(projected)
            activation = torch.zeros_like(projected)
            for i in reversed(range(self.bottleneck)):
                r_ii, r_tilde_ii = r[k, i, i], r_tilde[k, i, i]
                offset = u @ r_tilde[k, i] + self.bias[k, i]
                target = projected[..., i] - activation @ r[k, i]
                u_i = solve_monotone(
                    lambda t: t + r_ii * torch.tanh(r_tilde_ii * t + offset),
                    lambda t: 1 + r_ii * r_tilde_ii * (1 - torch.tanh(r_tilde_ii * t + offset).pow(2)),
                    target,
                    target - r_ii.abs(),
                    target + r_ii.abs(),
                )
                # u and activation were used above: write into copies so autograd stays valid.
                u, activation = u.clone(), activation.clone()
                u[..., i] = u_i
                activation[..., i] = torch.tanh(r_tilde_ii * u_i + offset)
            y = y - activation @ (q[k] @ r[k]).transpose(-1, -2)
        return y

    def extra_repr(self):
        return f"{super().extra_repr()}, bottleneck={self.bottleneck}"


class OrthogonalSylvester(_Sylvester):
    r"""Sylvester flow whose ``Q`` has ``bottleneck`` <= D orthonormal columns of a free matrix.

    Each layer maps

    .. math:: z' = z + Q R \tanh(\tilde R Q^\top z + b), \qquad
              \log|\det J| = \sum_{i=1}^{M} \log|1 + \tanh'(\cdot)_i R_{ii} \tilde R_{ii}|,

    with :math:`Q \in \mathbb R^{D\times M}`, :math:`Q^\top Q = I`, :math:`R, \tilde R` upper
    triangular and diagonals in (-1, 1) (so the layer is invertible). The paper orthogonalises the
    ``D x M`` parameter with an iterative (Bjorck) scheme; here the same parameter goes through a
    Householder QR factorisation, which is orthonormal to machine precision at every step. A
    truncated iteration would leave ``Q^T Q != I`` and silently bias the log-determinant above.

    van den Berg, Hasenclever, Tomczak & Welling, "Sylvester Normalizing Flows for Variational
    Inference", UAI 2018.

    Example::

        >>> flow = OrthogonalSylvester(dim=6, num_layers=4, bottleneck=3)
        >>> z = torch.randn(8, 6)
        >>> flow(z).shape
        torch.Size([8, 6])
    """

    def __init__(self, dim, num_layers=1, bottleneck=None):
        super().__init__(dim, num_layers, dim if bottleneck is None else bottleneck)
        self.q_raw = nn.Parameter(torch.randn(num_layers, dim, self.bottleneck))

    def orthonormal_bases(self):
        return torch.linalg.qr(self.q_raw).Q


class HouseholderSylvester(_Sylvester):
    r"""Sylvester flow whose square ``Q`` is a product of ``num_reflections`` Householder reflections.

    Same map and log-determinant as :class:`OrthogonalSylvester` with ``M = D`` and
    :math:`Q = H_H \cdots H_1`, :math:`H_h = I - 2 v_h v_h^\top / \|v_h\|^2`.

    van den Berg, Hasenclever, Tomczak & Welling, "Sylvester Normalizing Flows for Variational
    Inference", UAI 2018.

    Example::

        >>> flow = HouseholderSylvester(dim=5, num_layers=2, num_reflections=4)
        >>> z = torch.randn(3, 5)
        >>> torch.allclose(flow.inv(flow(z)), z, atol=1e-5)
        True
    """

    def __init__(self, dim, num_layers=1, num_reflections=None):
        super().__init__(dim, num_layers, dim)
        self.num_reflections = min(dim, 8) if num_reflections is None else int(num_reflections)
        bound = 1 / math.sqrt(dim)
        self.reflections = nn.Parameter(torch.empty(num_layers, self.num_reflections, dim).uniform_(-bound, bound))

    def orthonormal_bases(self):
        return householder_product(self.reflections)


class TriangularSylvester(_Sylvester):
    r"""Sylvester flow whose ``Q`` alternates between the identity and the reversal permutation.

    Same map and log-determinant as :class:`OrthogonalSylvester` with ``M = D`` and ``Q`` fixed:
    the identity in even layers and the order-reversing permutation in odd layers, so the
    triangular maps alternate between upper and lower triangular dependence.

    van den Berg, Hasenclever, Tomczak & Welling, "Sylvester Normalizing Flows for Variational
    Inference", UAI 2018.

    Example::

        >>> flow = TriangularSylvester(dim=4, num_layers=2)
        >>> flow(torch.randn(4)).shape
        torch.Size([4])
    """

    def __init__(self, dim, num_layers=1):
        super().__init__(dim, num_layers, dim)
        identity = torch.eye(dim)
        permutations = torch.stack([identity if k % 2 == 0 else identity.flip(-1) for k in range(num_layers)])
        self.register_buffer("_permutations", permutations)

    def orthonormal_bases(self):
        return self._permutations
