"""Radial flows (Rezende & Mohamed, 2015)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import NEAR_IDENTITY, FlowTransform


class Radial(FlowTransform):
    r"""A stack of ``num_layers`` radial layers held in one module.

    Each layer contracts or expands space around a centre :math:`z_0`:

    .. math:: z' = z + \frac{\beta}{\alpha + r}(z - z_0), \qquad r = \|z - z_0\|,

    .. math:: \log|\det J| = (D - 1)\log\Big(1 + \frac{\beta}{\alpha + r}\Big)
              + \log\Big(1 + \frac{\alpha\beta}{(\alpha + r)^2}\Big),

    with :math:`\alpha = \mathrm{softplus}(\tilde\alpha) > 0` and
    :math:`\beta = -\alpha + \mathrm{softplus}(\tilde\beta) > -\alpha`, which makes the layer
    invertible. The inverse is closed-form: :math:`r' = r(1 + \beta / (\alpha + r))` is a
    quadratic in :math:`r`.

    Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015.

    Example::

        >>> flow = Radial(dim=2, num_layers=8)
        >>> z = torch.randn(5, 2)
        >>> torch.allclose(flow.inv(flow(z)), z, atol=1e-5)
        True
    """

    def __init__(self, dim, num_layers=1):
        super().__init__(dim, num_layers)
        bound = 1 / math.sqrt(dim)
        self.centre = nn.Parameter(torch.empty(num_layers, dim).uniform_(-bound, bound))
        self.alpha_raw = nn.Parameter(torch.empty(num_layers).uniform_(-bound, bound))
        # beta = softplus(beta_raw) - softplus(alpha_raw) is ~0 here: each layer starts near the identity.
        self.beta_raw = nn.Parameter(self.alpha_raw.detach() + torch.empty(num_layers).uniform_(-NEAR_IDENTITY, NEAR_IDENTITY))

    def _alpha_beta(self):
        alpha = F.softplus(self.alpha_raw)
        return alpha, F.softplus(self.beta_raw) - alpha

    def forward_and_log_det(self, x):
        alpha, beta = self._alpha_beta()
        log_det = x.new_zeros(x.shape[:-1])
        for k in range(self.num_layers):
            offset = x - self.centre[k]
            radius = offset.norm(dim=-1)
            gain = beta[k] / (alpha[k] + radius)
            x = x + gain.unsqueeze(-1) * offset
            log_det = (
                log_det
                + (self.dim - 1) * torch.log1p(gain)
                + torch.log1p(alpha[k] * beta[k] / (alpha[k] + radius).pow(2))
            )
        return x, log_det

    def forward_and_score(self, x, score):
        # Each layer's Jacobian, (1 + g) I + r g'(r) e e^T with e the unit offset, is symmetric, with
        # eigenvalue 1 + g across e and 1 + alpha beta / (alpha + r)^2 along it: inverted in O(D).
        alpha, beta = self._alpha_beta()
        for k in range(self.num_layers):
            offset = x - self.centre[k]
            radius = offset.norm(dim=-1)
            unit = offset / radius.clamp(min=torch.finfo(x.dtype).tiny).unsqueeze(-1)
            distance = alpha[k] + radius
            gain = beta[k] / distance
            across, along = 1 + gain, 1 + alpha[k] * beta[k] / distance.pow(2)
            # d log|det J| / dr, which points along e
            log_det_slope = -(self.dim - 1) * gain / (distance * across) - 2 * alpha[k] * beta[k] / (distance.pow(3) * along)
            score = score - log_det_slope.unsqueeze(-1) * unit
            score = score / across.unsqueeze(-1) + ((1 / along - 1 / across) * (score * unit).sum(-1)).unsqueeze(-1) * unit
            x = x + gain.unsqueeze(-1) * offset
        return x, score

    def _inverse(self, y):
        alpha, beta = self._alpha_beta()
        for k in reversed(range(self.num_layers)):
            offset = y - self.centre[k]
            new_radius = offset.norm(dim=-1)
            # r^2 + (alpha + beta - r') r - alpha r' = 0; take the positive root without cancellation.
            linear = alpha[k] + beta[k] - new_radius
            root = torch.sqrt(linear.pow(2) + 4 * alpha[k] * new_radius)
            radius = torch.where(linear >= 0, 2 * alpha[k] * new_radius / (linear + root), (root - linear) / 2)
            y = self.centre[k] + offset / (1 + beta[k] / (alpha[k] + radius)).unsqueeze(-1)
        return y
