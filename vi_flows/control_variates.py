r"""A control variate for the subsample's noise in a step's gradient with respect to the globals.

A step on B of N items estimates the items' share of the ELBO, :math:`\sum_i f_i(\theta)` at the
globals :math:`\theta` a particle draws, as :math:`\frac{N}{B}\sum_{i \in B} f_i(\theta)`: its noise in the
globals' gradient grows as :math:`\sqrt{N/B}` while their posterior sds shrink as :math:`1/\sqrt{N}`
(:mod:`~vi_flows.autoflow.subsample_noise`). Given a slope :math:`g_i` per item at an anchor
:math:`\theta_0`, the linear terms :math:`h_i(\theta) = g_i \cdot (\theta - \theta_0)` have a sum over every
item known in O(1), :math:`G \cdot (\theta - \theta_0)` with :math:`G = \sum_i g_i`, so

.. math:: \frac{N}{B}\sum_{i \in B} \big(f_i(\theta) - h_i(\theta)\big) + G \cdot (\theta - \theta_0)

has the same expectation over subsamples, whatever the :math:`g_i`, and the noise of
:math:`f_i - h_i` alone: with :math:`g_i` the slope of a smooth stand-in for :math:`f_i` (an
``AutoFlow``'s collapsed evidence, :mod:`~vi_flows.autoflow.item_slopes`), a residual of the order of
:math:`\theta - \theta_0`, a few posterior sds. This is SVRG's correction (Johnson & Zhang, NeurIPS
2013) taken through the reparameterised draw, as control variates for stochastic-gradient MCMC
(Baker et al., Statistics and Computing 2019) linearise each item's log-likelihood at a mode.

The step adds the last two terms to each particle's log joint, as an argument of the objective
(:func:`~vi_flows.compiled_elbo.negative_elbo`); ``fit`` re-anchors the table at the guide's
posterior mean at each plateau (:meth:`LinearControlVariate.refresh`), O(N) a few times per fit.
"""

import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

# The anchor is the mean of this many of the guide's draws, drawn from a fixed seed: the same on
# every rank of a data-parallel fit, whose parameters are the same.
ANCHOR_DRAWS = 256


class LinearControlVariate:
    """The control variate of the module's docstring for the packed global latent that the guide
    samples at ``latent_site`` (a ``D``-vector per draw) and the items of the subsampled ``plate`` of
    ``num_items`` items. ``posterior()`` gives the guide's distribution of the packed latent, and
    ``slopes(latent, shard)`` every item's slope at a packed latent, ``(N, D)`` (data-parallel, each
    rank computing its ``shard``'s, :class:`~vi_flows.data_parallel.Shard`); :meth:`refresh` anchors it."""

    def __init__(self, latent_site, plate, num_items, posterior, slopes, like):
        self.latent_site, self.plate, self.num_items = latent_site, plate, num_items
        self._posterior, self._slopes_at = posterior, slopes
        self.anchor = torch.zeros_like(like)
        self.slopes = like.new_zeros(num_items, like.numel())
        self.total = torch.zeros_like(like)
        # How many times the items' terms count: a data-parallel rank holding its own items, world_size.
        self.weight = 1

    @torch.no_grad()
    def refresh(self, shard=None):
        """Anchor at the guide's posterior mean, in place: a compiled step reads these very tensors.
        Data-parallel, every rank calls it with its ``shard``."""
        with torch.random.fork_rng():
            torch.manual_seed(0)
            anchor = self._posterior().sample((ANCHOR_DRAWS,)).mean(0)
        slopes = self._slopes_at(anchor, shard)
        self.anchor.copy_(anchor)
        self.slopes.copy_(slopes)
        self.total.copy_(slopes.sum(0))

    def term(self, latent, indices):
        """``G . (theta - theta_0) - N/B sum_B g_i . (theta - theta_0)`` per draw of ``latent``
        (``(..., D)``) with the subsample ``indices``: zero in expectation over subsamples."""
        subsample = self.slopes.index_select(0, indices).sum(0) * (self.num_items / len(indices))
        term = (latent.reshape(-1, self.anchor.numel()) - self.anchor) @ (self.total - subsample)
        return term if self.weight == 1 else self.weight * term

    def reads(self):
        """A handler that records, in a run of guide and model, each draw of the latent and the
        plate's subsample it goes with; its ``terms()`` are then :meth:`term` per draw."""
        return _Reads(self)


class _Reads(Messenger):
    def __init__(self, control_variate):
        super().__init__()
        self._control_variate = control_variate
        self.latents, self.subsamples = [], []

    def _pyro_post_sample(self, msg):
        if msg["name"] == self._control_variate.latent_site:
            self.latents.append(msg["value"])
        elif msg["name"] == self._control_variate.plate and site_is_subsample(msg):
            # A replayed model reads the guide's subsample, the very tensor: once per run of the guide.
            if not any(msg["value"] is seen for seen in self.subsamples):
                self.subsamples.append(msg["value"])

    def terms(self):
        """The control variate per draw, in the order drawn (one run of the guide under a particle
        plate, or one run per particle)."""
        if len(self.latents) != len(self.subsamples):
            raise RuntimeError(f"{len(self.latents)} draws of the globals against {len(self.subsamples)} subsamples of {self._control_variate.plate!r}")
        return torch.cat([self._control_variate.term(latent, indices) for latent, indices in zip(self.latents, self.subsamples)])
