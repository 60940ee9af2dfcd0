r"""``AutoFlow``'s posterior over the packed latent vector, and the path-derivative gradient of its
log density ("sticking the landing": Roeder, Wu & Duvenaud, NeurIPS 2017).

The ELBO's gradient has a score term, :math:`E_q[\nabla_\phi \log q_\phi(z)]` at fixed :math:`z`,
whose expectation is zero; leaving it out keeps the estimate unbiased for ``Trace_ELBO``-type
objectives and its variance vanishes as :math:`q` approaches the posterior. What remains is
:math:`\log q` differentiated only through the draw. Computing that needs the score of :math:`q`
at every draw, carried through the flow layer by layer (:func:`~vi_flows.flows.base.forward_and_score`:
a closed form per built-in family, a dense Jacobian for other transforms), so objectives use it at small
dimensions only (:func:`vi_flows.compiled_elbo.negative_elbo`, which :func:`vi_flows.fit` runs).
"""

import pyro.distributions as dist
import torch

from ..flows.base import forward_and_score

# A flow posterior has no closed-form moments: mean and variance come from this many draws.
MOMENT_DRAWS = 10_000


class FlowPosterior(dist.TransformedDistribution):
    """A transformed standard normal that remembers its latest reparameterised draw, so that
    :meth:`path_derivative_log_prob` can score that draw with the path-derivative gradient.

    ``path_derivative(noise, draw)`` returns zero, differentiable only through ``draw``.
    """

    def __init__(self, base_dist, transforms, path_derivative, validate_args=None):
        self.path_derivative = path_derivative
        self._last_draw = None
        super().__init__(base_dist, transforms, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return FlowPosterior(self.base_dist.expand(batch_shape), self.transforms, self.path_derivative)

    def rsample(self, sample_shape=()):
        noise = self.base_dist.rsample(sample_shape)
        draw = noise
        for transform in self.transforms:
            draw = transform(draw)
        self._last_draw = (noise, draw)
        return draw

    @property
    def mean(self):
        """A Monte Carlo estimate from ``MOMENT_DRAWS`` draws with a fixed seed (the same on every call)."""
        return self._fixed_draws().mean(0)

    @property
    def variance(self):
        """A Monte Carlo estimate, as :attr:`mean`."""
        return self._fixed_draws().var(0)

    @torch.no_grad()
    def _fixed_draws(self):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return self.sample((MOMENT_DRAWS,))

    def path_derivative_log_prob(self, value):
        """``log_prob(value)``; at the latest draw its gradient flows through the draw alone."""
        log_q = self.log_prob(value)
        if self._last_draw is None or value is not self._last_draw[1]:
            return log_q
        noise, draw = self._last_draw
        return log_q.detach() + self.path_derivative(noise, draw)


def path_derivative(noise, draw, base, flow, outer, non_centring=None):
    r"""Zero, with the gradient of :math:`\log q(\text{draw})` that flows through the draw alone, for
    the guide ``draw = non_centring(outer(flow(base(noise))))`` (``non_centring`` optional).

    With :math:`y = f(x)` the flow's output and :math:`x = B\varepsilon` its input, the score of
    :math:`q` in :math:`y` is :math:`J_f^{-T} \nabla_x [\log N(B^{-1}x) - \log|\det J_f(x)|]`; it is
    paired with :math:`y` recomputed from the draw through the outer affine map (and the inverse
    non-centring) with their parameters held fixed.
    """
    flow_input, base_score = base.input_and_score(noise.detach())
    score = forward_and_score(flow, flow_input, base_score)[1]
    result = 0.0
    if non_centring is not None:  # log q(draw) = log q_u(u) - log|det dx/du|, with u its inverse
        u = non_centring.inv(draw)
        log_det = non_centring.log_abs_det_jacobian(u, draw)
        result = log_det.detach() - log_det
        draw = u
    offset = (draw - outer.loc.detach()).unsqueeze(-1)
    flow_output = torch.linalg.solve_triangular(outer.scale_tril.detach(), offset, upper=False).squeeze(-1)
    return result + (score * (flow_output - flow_output.detach())).sum(-1)
