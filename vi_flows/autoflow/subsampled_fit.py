"""What ``fit`` asks of an ``AutoFlow`` whose local posteriors' plate is subsampled: the noise of a
step in the globals, a control variate for it, a refit of every item's rows, and how far the
globals stand from where refitted rows would put them."""

from .. import pyro_internals
from .item_refit import refit_items
from .item_shift import item_shift
from .item_slopes import evidence_control_variate, subsampled_plate
from .subsample_noise import subsample_noise


class SubsampledFitting:
    """Methods of ``AutoFlow`` for a fit on subsamples of a plate of local latents (each sets the
    guide up for the model's arguments first)."""

    def subsample_noise(self, *args, control_variate=None, **kwargs):
        """``{global site: noise per unconstrained coordinate}``: the sd of one step's slope on a
        subsample, in posterior sds, with ``control_variate`` where given (``fit``'s, see
        :meth:`control_variate`; :mod:`~vi_flows.autoflow.subsample_noise`); empty where no local
        posterior's plate is subsampled."""
        self.setup(*args, **kwargs)
        if subsampled_plate(self) is None or not self.latent_dim:
            return {}
        noise = subsample_noise(self, *args, control_variate=control_variate, **kwargs)
        return self._by_site(noise)

    def control_variate(self, *args, **kwargs):
        """A :class:`~vi_flows.control_variates.LinearControlVariate` (not yet anchored) for the
        subsample's noise in the globals, from each item's slope of its collapsed evidence
        (:mod:`~vi_flows.autoflow.item_slopes`); None where no local posterior's plate is subsampled."""
        self.setup(*args, **kwargs)
        return evidence_control_variate(self, *args, **kwargs) if self.latent_dim else None

    def refit_items(self, *args, shard=None, **kwargs):
        """Move every item's per-item rows to their optimum given the globals' posterior
        (:mod:`~vi_flows.autoflow.item_refit`; data-parallel, each rank its ``shard``'s): a
        :class:`~vi_flows.autoflow.item_refit.Refit` saying how far they moved, or None where the
        local posteriors cannot be refitted."""
        self.setup(*args, **kwargs)
        return refit_items(self, *args, shard=shard, **kwargs)

    def item_shift(self, *args, shard=None, **kwargs):
        """``{global site: shift per unconstrained coordinate}``: how far, in posterior sds, the globals
        would move if every item's rows were refitted (:mod:`~vi_flows.autoflow.item_shift`; data-parallel,
        each rank its ``shard``'s items); empty where no local posterior's plate is subsampled or the
        rows cannot be refitted."""
        self.setup(*args, **kwargs)
        if subsampled_plate(self) is None or not self.latent_dim:
            return {}
        shift = item_shift(self, *args, shard=shard, **kwargs)
        return {} if shift is None else self._by_site(shift)

    def _by_site(self, packed):
        return {site["name"]: value for site, value in pyro_internals.unpack_latent(self, packed)}
