r"""Partial non-centring of a model's hierarchical latents, inside the guide.

A centred hierarchy ``theta ~ Normal(mu, tau)`` or Neal's funnel ``x ~ Normal(0, exp(y / 2))`` has a
posterior whose width in ``theta`` or ``x`` changes by orders of magnitude with ``tau`` or ``y``; a
flow of fixed capacity fits that only near the draws it trained on and under-covers the tails.
Non-centring (``theta = mu + tau * z``) removes the dependence when the data are weak and creates
one when they are strong, so no fixed choice suits every model (Papaspiliopoulos, Roberts &
Sköld, "A general framework for the parametrization of hierarchical models", Statistical Science
2007); Gorinova, Moore & Hoffman ("Automatic Reparameterisation of Probabilistic Programs", ICML
2020) learn the degree of centring with the guide. Here :func:`linearise_prior` reads each latent's
prior location and scale, how they follow its parents, and the degree of non-centring its data
call for, from the model at the guide's centre, and :class:`PartialNonCentring` applies them as a
bijection of the packed unconstrained vector, so the guide still emits the model's own sites.
"""

import torch
from pyro import poutine
from pyro.distributions.torch_transform import TransformModule
from torch.distributions import biject_to, constraints

from ..flows.base import without_cache
from ..pyro_internals import unpack_latent

# Slopes this small are autograd's rounding, not a dependence.
SLOPE_TOLERANCE = 1e-6


def linearise_prior(guide, *args, **kwargs):
    r"""Where each coordinate of a set-up ``AutoContinuous`` guide's latent vector is centred by its
    prior, and how that location and the prior's scale follow the coordinates sampled before it,
    to first order about the guide's centre :math:`c`.

    For coordinate :math:`i` of the unconstrained latent vector :math:`u`, with score :math:`g_i` and
    curvature :math:`h_i < 0` of its own prior term :math:`\log p_i` (likelihood terms are not looked
    at), the prior's location is the Newton point :math:`m_i = u_i - g_i / h_i` and its scale
    :math:`\sigma_i = (-h_i)^{-1/2}`, both exact for a normal. Returns ``(location, location_slopes,
    scale_slopes, prior_share)``: :math:`m(c)` of shape ``(D,)``, the ``(D, D)`` matrices
    :math:`L_{ij} = \partial m_i / \partial u_j` and :math:`S_{ij} = \partial \log\sigma_i / \partial u_j`,
    zero on and above the diagonal and in every row without a scale parent (:math:`S_i = 0`), and
    :math:`h_i / H_{ii}`, the prior's share of the whole log joint's curvature :math:`H_{ii}` (in
    [0, 1], zero without a scale parent). That share is the optimal degree of non-centring of a
    normal child with normal data (Papaspiliopoulos, Roberts & Sköld 2007): 1 where the prior
    alone sets the child (the funnel), near 0 where the data pin it. A
    centred hierarchy ``theta ~ Normal(mu, tau)`` has :math:`S` = 1 from ``theta`` to ``log tau`` and
    :math:`L` = 1 to ``mu``; the funnel's ``x ~ Normal(0, exp(y / 2))`` has :math:`S` = 1/2 to ``y``;
    the banana's ``x2 ~ Normal(f(x1), 1)`` has no scale parent, so nothing. Curvatures are taken per
    element, exact for sites whose elements are conditionally independent (plates, ``to_event`` of
    scalars); a site whose curvature is not negative everywhere is left alone.
    """
    latent = guide.centre.detach().clone().requires_grad_()
    dim = guide.latent_dim
    location = latent.detach().clone()
    location_slopes = latent.new_zeros(dim, dim)
    scale_slopes = latent.new_zeros(dim, dim)
    prior_share = latent.new_zeros(dim)
    unpacked = unpack_latent(guide, latent)
    values = {site["name"]: biject_to(site["fn"].support)(value) for site, value in unpacked}
    with poutine.block(), torch.enable_grad():
        trace = poutine.trace(poutine.condition(guide.model, data=values)).get_trace(*args, **kwargs)
        joint_score = _gradient(trace.log_prob_sum(), latent, create_graph=True)
        start = 0
        for site, value in unpacked:
            stop = start + value.numel()
            if start > 0:
                site = trace.nodes[site["name"]]
                score = _gradient(site["fn"].log_prob(site["value"]).sum(), latent, create_graph=True)[start:stop]
                # Differentiating the summed score gives each element's own second derivative when
                # the site's elements are conditionally independent.
                curvature = _gradient(score.sum(), latent, create_graph=True)[start:stop]
                if (curvature < 0).all():
                    site_scale_slopes = _jacobian(-0.5 * torch.log(-curvature), latent)[:, :start]
                    has_scale_parent = (site_scale_slopes.abs() > SLOPE_TOLERANCE).any(-1, keepdim=True)
                    site_location = latent[start:stop] - score / curvature
                    location[start:stop] = torch.where(has_scale_parent.squeeze(-1), site_location.detach(), location[start:stop])
                    location_slopes[start:stop, :start] = _jacobian(site_location, latent)[:, :start] * has_scale_parent
                    scale_slopes[start:stop, :start] = site_scale_slopes * has_scale_parent
                    joint_curvature = _jacobian(joint_score[start:stop], latent)[:, start:stop].diagonal()
                    share = torch.where(joint_curvature < 0, curvature.detach() / joint_curvature, 1.0).clamp(0.0, 1.0)
                    prior_share[start:stop] = share * has_scale_parent.squeeze(-1)
            start = stop
    for slopes in (location_slopes, scale_slopes):
        slopes[slopes.abs() <= SLOPE_TOLERANCE] = 0.0
    return location, location_slopes, scale_slopes, prior_share


def non_centring_of(guide, *args, **kwargs):
    """The :class:`PartialNonCentring` of a set-up ``AutoContinuous`` guide, linearised about its
    centre, or ``None`` for a model without scale parents. A guide re-linearised (at a Laplace
    mode) keeps a map as deep as its previous one, ``guide.non_centring``."""
    location, location_slopes, scale_slopes, prior_share = linearise_prior(guide, *args, **kwargs)
    previous = getattr(guide, "non_centring", None)
    depth = max(chain_depth(location_slopes, scale_slopes), previous.depth if previous is not None else 0)
    if depth == 0:
        return None
    # Each child is non-centred as far as its prior, not its data, sets it; fixed, not learned:
    # the funnel's sd(x) is exp((w^2 - 1) 9/4) of the truth, so a 2% error in w is 10% in sd,
    # and learned weights ended 0.985-1.015.
    return PartialNonCentring(guide.centre, location, location_slopes, scale_slopes, prior_share, depth)


def _gradient(value, inputs, create_graph=False):
    """d value / d inputs, zero where ``value`` does not depend on them (a constant has no graph)."""
    if not value.requires_grad:
        return torch.zeros_like(inputs)
    return torch.autograd.grad(value, inputs, retain_graph=True, create_graph=create_graph, materialize_grads=True)[0]


def _jacobian(outputs, inputs):
    """d outputs / d inputs of a vector function: all rows in one batched reverse pass where
    autograd can batch the graph, else one pass per row."""
    if not outputs.requires_grad:  # constant in the inputs (a normal's curvature with a fixed scale)
        return outputs.new_zeros(outputs.shape + inputs.shape)
    rows = torch.eye(len(outputs), dtype=outputs.dtype, device=outputs.device)
    try:
        return torch.autograd.grad(outputs, inputs, rows, retain_graph=True, is_grads_batched=True, materialize_grads=True)[0]
    except RuntimeError:  # an operation without a batching rule
        return torch.stack([_gradient(output, inputs) for output in outputs])


class PartialNonCentring(TransformModule):
    r"""Moves and rescales each coordinate as its prior's location and scale follow its parents,
    to a degree :math:`w`: the linearised partial non-centring of a hierarchical model.

    .. math:: x_i = m_i + w_i\, [L (x - o)]_i + (u_i - m_i)\, e^{s_i}, \qquad s = w \odot S (x - o),
        \qquad \log|\det J| = \textstyle\sum_i s_i,

    with the prior's location :math:`m`, location slopes :math:`L` and scale slopes :math:`S` taken at
    the point :math:`o` (``origin``) by :func:`linearise_prior`. :math:`L` and :math:`S` are strictly
    lower triangular, so the Jacobian is triangular with diagonal :math:`e^{s}`; where the parents
    sit at :math:`o` the map is the identity. The weight :math:`w_i` is the degree of non-centring:
    1 is the non-centred parametrisation of a normal child (``theta = mu + tau * z``), 0 the
    centred one, and values between interpolate, as in Gorinova, Moore & Hoffman's variationally
    inferred parametrisation; ``AutoFlow`` sets it to the prior's share of the child's curvature.
    Location and scale follow the parents' *output* values,
    the model's own, so a chain (grandparent, parent, child) is filled in over ``depth`` passes,
    its length; the inverse is one pass: :math:`u = m + (x - m - w \odot L (x - o))\, e^{-s}`.
    :math:`s` is clamped to ``log_scale_bounds``.

    Gorinova, Moore & Hoffman, "Automatic Reparameterisation of Probabilistic Programs", ICML 2020.

    Example::

        >>> slopes = torch.tensor([[0.0, 0.0], [0.5, 0.0]])  # Neal's funnel: x ~ Normal(0, exp(y / 2))
        >>> zero = torch.zeros(2)
        >>> layer = PartialNonCentring(zero, zero, torch.zeros(2, 2), slopes, weight=torch.ones(2))
        >>> layer(torch.tensor([2.0, 1.0]))  # y = 2: x's scale is e
        tensor([2.0000, 2.7183])
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1
    log_scale_bounds = (-15.0, 15.0)

    def __init__(self, origin, location, location_slopes, scale_slopes, weight, depth=None, cache_size=1):
        super().__init__(cache_size=cache_size)
        linearisation = dict(origin=origin, location=location, location_slopes=location_slopes, scale_slopes=scale_slopes)
        for name, value in {**linearisation, "weight": weight}.items():
            self.register_buffer(name, value.detach().clone())
        self.depth = chain_depth(location_slopes, scale_slopes) if depth is None else depth

    __getstate__ = without_cache

    def _shift_and_log_scale(self, x):
        offset = x - self.origin
        shift = self.location + self.weight * (offset @ self.location_slopes.T)
        return shift, (self.weight * (offset @ self.scale_slopes.T)).clamp(*self.log_scale_bounds)

    def _call(self, u):
        x = u
        for _ in range(self.depth):
            shift, log_scale = self._shift_and_log_scale(x)
            x = shift + (u - self.location) * log_scale.exp()
        return x

    def _inverse(self, x):
        shift, log_scale = self._shift_and_log_scale(x)
        return self.location + (x - shift) * (-log_scale).exp()

    def log_abs_det_jacobian(self, u, x):
        return self._shift_and_log_scale(x)[1].sum(-1)


def chain_depth(*slopes):
    """Length of the longest chain child -> parent -> grandparent ... through any of the strictly
    lower-triangular ``slopes`` matrices: how many passes :class:`PartialNonCentring` needs."""
    has_parent = sum(matrix != 0 for matrix in slopes).bool()
    # A coordinate's level is one more than its highest parent's (0 without parents); levels
    # settle after as many sweeps as the longest chain, each sweep D x D elementwise.
    level = has_parent.new_zeros(has_parent.shape[0], dtype=torch.int64)
    while True:
        settled = torch.where(has_parent, level + 1, 0).amax(-1)
        if torch.equal(settled, level):
            return int(level.max())
        level = settled
