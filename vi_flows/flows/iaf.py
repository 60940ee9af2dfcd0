"""Inverse autoregressive flows (Kingma et al., 2016)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import NEAR_IDENTITY, FlowTransform


def _made_masks(dim, hidden_dim, input_degrees):
    """Masks of a one-hidden-layer MADE in which output ``i`` sees only inputs of lower degree.

    Hidden degrees cycle through 1..dim-1; a layer narrower than that spreads them evenly over the
    range instead of keeping the first ``hidden_dim``, so late outputs see more than the first inputs."""
    span = max(dim - 1, 1)
    hidden_degrees = torch.arange(hidden_dim)
    hidden_degrees = hidden_degrees % span + 1 if hidden_dim >= span else hidden_degrees * span // hidden_dim + 1
    input_mask = (hidden_degrees.unsqueeze(-1) >= input_degrees).to(torch.get_default_dtype())
    output_mask = (input_degrees.unsqueeze(-1) > hidden_degrees).to(torch.get_default_dtype())
    return input_mask, output_mask


# The default hidden width is 3 dim + 10 up to this. Adam moves every weight by about the learning
# rate, so a unit's output moves in proportion to its fan-in: at 910 units (a 300-coefficient
# regression) the default fit's loss diverged in its warm-up, and at 3010 a step took 6.7x as long as at 320
# (RESULTS.md, "The default flow at large dimension"). 320 is the width the zoo's largest global
# posterior (hierarchical_100, 102 coordinates) is fitted and tested with.
MAX_DEFAULT_HIDDEN_DIM = 320


class IAF(FlowTransform):
    r"""A stack of ``num_layers`` affine inverse autoregressive layers held in one module.

    Each layer runs a masked autoencoder (MADE) with one hidden layer on :math:`z` to get
    :math:`\mu_i(z_{<i})` and :math:`s_i(z_{<i})`, then maps

    .. math:: z'_i = \mu_i + \sigma_i z_i, \quad \sigma_i = e^{s_i}, \qquad
              \log|\det J| = \sum_i s_i,

    or, with ``gated=True``, the paper's numerically stable update
    :math:`z'_i = \sigma_i z_i + (1 - \sigma_i)\mu_i` with :math:`\sigma_i = \mathrm{sigmoid}(s_i)`.
    The autoregressive order is reversed between consecutive layers (the permutation between
    stacked layers), and the inverse solves for one coordinate at a time.

    Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling, "Improved Variational Inference with
    Inverse Autoregressive Flow", NeurIPS 2016.

    Example::

        >>> flow = IAF(dim=3, num_layers=2, hidden_dim=16)
        >>> z = torch.randn(4, 3)
        >>> torch.allclose(flow.inv(flow(z)), z, atol=1e-5)
        True
    """

    log_scale_bounds = (-5.0, 3.0)
    gate_bias = 2.0  # the paper starts the gate near 1, so each layer starts close to the identity
    # As a conditional flow, the context enters the MADE's hidden layer (Kingma et al. 2016).
    conditioned = ("hidden_bias",)

    def __init__(self, dim, num_layers=1, hidden_dim=None, gated=False):
        super().__init__(dim, num_layers)
        self.hidden_dim = min(3 * dim + 10, MAX_DEFAULT_HIDDEN_DIM) if hidden_dim is None else int(hidden_dim)
        self.gated = bool(gated)
        degrees = torch.arange(1, dim + 1)
        masks = [_made_masks(dim, self.hidden_dim, degrees if k % 2 == 0 else degrees.flip(0)) for k in range(num_layers)]
        self.register_buffer("_input_masks", torch.stack([m[0] for m in masks]))
        self.register_buffer("_output_masks", torch.stack([m[1] for m in masks]).repeat(1, 2, 1))
        in_bound, out_bound = 1 / math.sqrt(dim), NEAR_IDENTITY / math.sqrt(self.hidden_dim)
        self.hidden_weight = nn.Parameter(torch.empty(num_layers, self.hidden_dim, dim).uniform_(-in_bound, in_bound))
        self.hidden_bias = nn.Parameter(torch.empty(num_layers, self.hidden_dim).uniform_(-in_bound, in_bound))
        self.output_weight = nn.Parameter(torch.empty(num_layers, 2 * dim, self.hidden_dim).uniform_(-out_bound, out_bound))
        self.output_bias = nn.Parameter(torch.zeros(num_layers, 2 * dim))

    def _masked_weights(self, k):
        """The layer's MADE weights, input to hidden and hidden to output, with their masks applied."""
        return self.hidden_weight[k] * self._input_masks[k], self.output_weight[k] * self._output_masks[k]

    def _made(self, x, k):
        """The layer's MADE at the input ``x``: its hidden pre-activation, shift ``mu`` and raw scale."""
        input_weight, output_weight = self._masked_weights(k)
        pre_activation = x @ input_weight.T + self.hidden_bias[k]
        output = F.elu(pre_activation) @ output_weight.T + self.output_bias[k]
        return (pre_activation, *output.chunk(2, -1))

    def _log_scale(self, raw_scale):
        if self.gated:  # the gate's floor keeps it invertible where it would underflow to zero
            return F.logsigmoid(raw_scale + self.gate_bias).clamp(min=self.log_scale_bounds[0])
        return raw_scale.clamp(*self.log_scale_bounds)

    def _shift_and_log_scale(self, x, k):
        """Return the layer's autoregressive shift ``mu`` and log-scale of the input ``x``."""
        _, shift, raw_scale = self._made(x, k)
        return shift, self._log_scale(raw_scale)

    def _layer(self, x, k):
        shift, log_scale = self._shift_and_log_scale(x, k)
        return self._output(x, shift, log_scale), log_scale.sum(-1)

    def _output(self, x, shift, log_scale):
        if self.gated:
            gate = log_scale.exp()
            return gate * x + (1 - gate) * shift
        return shift + log_scale.exp() * x

    def forward_and_log_det(self, x):
        log_det = x.new_zeros(x.shape[:-1])
        for k in range(self.num_layers):
            x, layer_log_det = self._layer(x, k)
            log_det = log_det + layer_log_det
        return x, log_det

    def forward_and_score(self, x, score):
        # Each layer's Jacobian in closed form (the MADE's is W_out diag(elu') W_in at each point),
        # triangular in the layer's order: one triangular solve per layer, where a dense Jacobian
        # by forward-mode differentiation of the whole stack would cost D passes of it.
        low, high = self.log_scale_bounds
        for k in range(self.num_layers):
            pre_activation, shift, raw_scale = self._made(x, k)
            input_weight, output_weight = self._masked_weights(k)
            elu_slope = torch.where(pre_activation > 0, 1.0, pre_activation.exp())
            shift_jacobian, raw_jacobian = ((output_weight * elu_slope.unsqueeze(-2)) @ input_weight).chunk(2, -2)
            log_scale = self._log_scale(raw_scale)
            scale = log_scale.exp()
            if self.gated:  # d log sigmoid(r)/dr = 1 - sigmoid(r); the floor's slope as autograd takes it
                log_scale_slope = (1 - scale) * (F.logsigmoid(raw_scale + self.gate_bias) >= low)
                scaled_input, shift_jacobian = scale * (x - shift), (1 - scale).unsqueeze(-1) * shift_jacobian
            else:  # the clamp's slope as autograd takes it: one on the closed interval
                log_scale_slope = ((raw_scale >= low) & (raw_scale <= high)).to(x.dtype)
                scaled_input = scale * x
            log_scale_jacobian = log_scale_slope.unsqueeze(-1) * raw_jacobian
            jacobian = shift_jacobian + torch.diag_embed(scale) + scaled_input.unsqueeze(-1) * log_scale_jacobian
            adjusted = (score - log_scale_jacobian.sum(-2)).unsqueeze(-1)
            # Even layers see earlier coordinates (J lower-triangular), odd ones later (upper).
            score = torch.linalg.solve_triangular(jacobian.mT, adjusted, upper=k % 2 == 0).squeeze(-1)
            x = self._output(x, shift, log_scale)
        return x, score

    def _inverse(self, y):
        for k in reversed(range(self.num_layers)):
            order = range(self.dim) if k % 2 == 0 else reversed(range(self.dim))
            x = torch.zeros_like(y)
            # Coordinate i depends only on coordinates earlier in the layer's order, so one pass
            # per coordinate, in that order, recovers x exactly.
            for i in order:
                shift, log_scale = self._shift_and_log_scale(x, k)
                scale = log_scale[..., i].exp()
                x = x.clone()  # x was used above: write into a copy so autograd stays valid
                if self.gated:
                    x[..., i] = (y[..., i] - (1 - scale) * shift[..., i]) / scale
                else:
                    x[..., i] = (y[..., i] - shift[..., i]) / scale
            y = x
        return y

    def extra_repr(self):
        return f"{super().extra_repr()}, hidden_dim={self.hidden_dim}, gated={self.gated}"
