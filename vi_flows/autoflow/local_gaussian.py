"""The Gaussian of a local item: its prior, where Gaussian in unconstrained space, times a Gaussian
pseudo-observation (:mod:`~vi_flows.autoflow.local`), and that Gaussian pushed to the site's support,
scoring its draws with the path derivative."""

import pyro.distributions as dist

_WRAPPERS = (dist.Independent, dist.MaskedDistribution, dist.ExpandedDistribution)


def gaussian_prior(prior):
    """``(loc, scale)`` of ``prior`` in its unconstrained space, broadcast to its shape, where it is
    Gaussian there (``Normal``, ``LogNormal``, under ``expand``, ``to_event``, ``mask``); else None."""
    fn = prior
    while isinstance(fn, _WRAPPERS):
        fn = fn.base_dist
    if isinstance(fn, dist.LogNormal):
        fn = fn.base_dist
    elif not isinstance(fn, dist.Normal):
        return None
    shape = prior.shape()
    return fn.loc.expand(shape), fn.scale.expand(shape)


class PathDerivativeGaussian(dist.TransformedDistribution):
    """A local site's Gaussian posterior pushed to its support that also scores its draws with the
    path-derivative gradient (``path_derivative_log_prob``: its own parameters held fixed; the
    globals' values, draws themselves, still carry their gradient)."""

    def __init__(self, base, to_support, detached_base):
        super().__init__(base, to_support)
        self._detached = dist.TransformedDistribution(detached_base, to_support)

    def path_derivative_log_prob(self, value):
        return self._detached.log_prob(value)

    def expand(self, batch_shape, _instance=None):  # a plate may broadcast it
        return PathDerivativeGaussian(self.base_dist.expand(batch_shape), self.transforms[0], self._detached.base_dist.expand(batch_shape))


def item_gaussian(prior, loc, precision):
    """``(loc, scale)`` of each item in unconstrained space: ``prior`` times ``N(loc, 1/precision)``
    where the prior is Gaussian there, else ``N(loc, 1/precision)``."""
    gaussian = gaussian_prior(prior)
    if gaussian is not None:
        prior_loc, prior_scale = gaussian
        prior_precision = prior_scale.pow(-2)
        precision = prior_precision + precision
        loc = (prior_precision * prior_loc + (precision - prior_precision) * loc) / precision
    return loc, precision.rsqrt()
