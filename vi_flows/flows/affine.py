"""Elementwise affine flows: a learnable shift and scale per coordinate."""

import torch
from torch import nn

from .base import FlowTransform


class Affine(FlowTransform):
    r"""``num_layers`` elementwise affine maps, composed into one:

    .. math:: z' = \mu + e^{s} \odot z, \qquad \log|\det J| = \sum_i s_i,

    with the layers' shifts and log-scales summed the way their composition does. On its own it is a
    mean-field Gaussian's reparameterisation; as a conditional flow
    (:class:`~vi_flows.flows.conditional.ConditionalFlow`) it gives each item its own Gaussian, the
    posterior of a plain VAE (Kingma & Welling 2014). It starts at the identity.

    Example::

        >>> flow = Affine(dim=3)
        >>> torch.equal(flow(torch.ones(3)), torch.ones(3))
        True
    """

    log_scale_bounds = (-10.0, 10.0)  # e^10 either way: beyond it a float32 draw loses every digit

    def __init__(self, dim, num_layers=1):
        super().__init__(dim, num_layers)
        self.shift = nn.Parameter(torch.zeros(num_layers, dim))
        self.log_scale = nn.Parameter(torch.zeros(num_layers, dim))

    def _shift_and_log_scale(self):
        """The one affine map the layers compose to: ``z -> shift + exp(log_scale) z``."""
        log_scales = self.log_scale.clamp(*self.log_scale_bounds)
        shift, log_scale = torch.zeros_like(self.shift[0]), torch.zeros_like(log_scales[0])
        for k in range(self.num_layers):
            shift = self.shift[k] + log_scales[k].exp() * shift
            log_scale = log_scale + log_scales[k]
        return shift, log_scale

    def forward_and_log_det(self, x):
        shift, log_scale = self._shift_and_log_scale()
        return shift + log_scale.exp() * x, log_scale.sum(-1).expand(x.shape[:-1])

    def forward_and_score(self, x, score):
        # A diagonal Jacobian and a constant log|det J|: the score is divided by the scales.
        shift, log_scale = self._shift_and_log_scale()
        scale = log_scale.exp()
        return shift + scale * x, score / scale

    def _inverse(self, y):
        shift, log_scale = self._shift_and_log_scale()
        return (y - shift) * torch.exp(-log_scale)
