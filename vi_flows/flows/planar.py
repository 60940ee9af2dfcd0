"""Planar flows (Rezende & Mohamed, 2015)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import NEAR_IDENTITY, FlowTransform, solve_monotone

_LOG_E_MINUS_1 = math.log(math.e - 1)


class Planar(FlowTransform):
    r"""A stack of ``num_layers`` planar layers held in one module.

    Each layer maps

    .. math:: z' = z + \hat u \tanh(w^\top z + b), \qquad
              \log|\det J| = \log|1 + \tanh'(w^\top z + b)\, \hat u^\top w|,

    where :math:`\hat u = u + (m(w^\top u) - w^\top u)\, w / \|w\|^2` with
    :math:`m(x) = \mathrm{softplus}(x + \log(e - 1)) - 1` keeps :math:`\hat u^\top w > -1`, which
    makes the layer invertible. (The paper's :math:`m` has no shift; with it :math:`m(0) = 0`, so a
    small :math:`u`, the initialisation here, is a near-identity layer.) The inverse solves the increasing scalar equation
    :math:`a + \hat u^\top w \tanh(a) = w^\top z' + b` for :math:`a = w^\top z + b`.

    Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015.

    Example::

        >>> flow = Planar(dim=3, num_layers=4)
        >>> z = torch.randn(10, 3)
        >>> flow.log_abs_det_jacobian(z, flow(z)).shape
        torch.Size([10])
    """

    def __init__(self, dim, num_layers=1):
        super().__init__(dim, num_layers)
        bound = 1 / math.sqrt(dim)
        self.u = nn.Parameter(torch.empty(num_layers, dim).uniform_(-NEAR_IDENTITY * bound, NEAR_IDENTITY * bound))
        self.w = nn.Parameter(torch.empty(num_layers, dim).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.empty(num_layers).uniform_(-bound, bound))

    def _constrained_u(self):
        """Return ``(u_hat, u_hat . w)`` for every layer."""
        w_dot_u = (self.w * self.u).sum(-1)
        u_hat_dot_w = F.softplus(w_dot_u + _LOG_E_MINUS_1) - 1
        u_hat = self.u + ((u_hat_dot_w - w_dot_u) / self.w.pow(2).sum(-1)).unsqueeze(-1) * self.w
        return u_hat, u_hat_dot_w

    def forward_and_log_det(self, x):
        u_hat, u_hat_dot_w = self._constrained_u()
        log_det = x.new_zeros(x.shape[:-1])
        for k in range(self.num_layers):
            activation = torch.tanh(x @ self.w[k] + self.b[k])
            x = x + activation.unsqueeze(-1) * u_hat[k]
            log_det = log_det + torch.log1p((1 - activation.pow(2)) * u_hat_dot_w[k])
        return x, log_det

    def forward_and_score(self, x, score):
        # Each layer's Jacobian I + h' u_hat w^T is a rank-one update of the identity: its inverse
        # transpose is Sherman-Morrison's, O(D) per point (a dense Jacobian costs D forward passes).
        u_hat, u_hat_dot_w = self._constrained_u()
        for k in range(self.num_layers):
            activation = torch.tanh(x @ self.w[k] + self.b[k])
            slope = 1 - activation.pow(2)
            determinant = 1 + slope * u_hat_dot_w[k]
            # minus the gradient of log|det J| = log(1 + h'(a) u_hat.w), with h'' = -2 h h'
            score = score + (2 * activation * slope * u_hat_dot_w[k] / determinant).unsqueeze(-1) * self.w[k]
            score = score - (slope * (score @ u_hat[k]) / determinant).unsqueeze(-1) * self.w[k]
            x = x + activation.unsqueeze(-1) * u_hat[k]
        return x, score

    def _inverse(self, y):
        u_hat, u_hat_dot_w = self._constrained_u()
        for k in reversed(range(self.num_layers)):
            c = u_hat_dot_w[k]
            target = y @ self.w[k] + self.b[k]
            pre_activation = solve_monotone(
                lambda a: a + c * torch.tanh(a),
                lambda a: 1 + c * (1 - torch.tanh(a).pow(2)),
                target,
                target - c.abs(),
                target + c.abs(),
            )
            y = y - torch.tanh(pre_activation).unsqueeze(-1) * u_hat[k]
        return y
