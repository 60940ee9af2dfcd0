r"""Local latents: one Gaussian posterior per item of a plate, following the globals through the prior.

A latent site is local when its plate holds data or is subsampled (:func:`~vi_flows.autoflow.sites.local_sites`):
each item :math:`i` then has its own posterior. Where the site's prior given the values sampled
before it is Gaussian in unconstrained space, :math:`N(m(\theta), s(\theta)^2)` (a ``Normal``, a
``LogNormal``, through ``expand``, ``to_event`` or a mask), item :math:`i`'s posterior is that
prior times a learned Gaussian pseudo-observation :math:`N(a_i, \beta_i^{-1})`:

.. math:: q(z_i \mid \theta) = N\!\left(\frac{m/s^2 + \beta_i a_i}{1/s^2 + \beta_i},\; \frac{1}{1/s^2 + \beta_i}\right),

exact where each item's likelihood is Gaussian in :math:`z_i` (a conjugate hierarchy), the Gaussian
potentials of structured VAEs (Johnson et al., NeurIPS 2016) otherwise. It keeps the dependence of
:math:`z_i` on the globals drawn in the same particle, which makes a centred hierarchy a funnel
(the structured family of Agrawal & Domke, NeurIPS 2021), at two parameters per coordinate. Where
the prior is not Gaussian in unconstrained space, :math:`q(z_i) = N(a_i, \beta_i^{-1})` (mean-field, with
a warning naming the site).

The pseudo-observations come from a table per item or from a network of each item's data
(:mod:`~vi_flows.autoflow.pseudo_observations`); with a subsampled plate one step reads and
samples the items of its subsample only. A local flow (any registered flow as a
:class:`~vi_flows.flows.conditional.ConditionalFlow`) can follow the Gaussian, each item's own: its
context is the item's row of a learned table (per item) or the encoder's hidden layer (amortised),
as the Sylvester flows' encoder emits each data point's flow (van den Berg et al. 2018).

Without a local flow, a draw is scored with the path-derivative gradient where ``fit`` asks for it
(``path_derivative_log_prob``; Roeder et al. 2017): at the exact conditional posterior of a
conjugate item its gradient vanishes for every draw, so a rarely visited item's parameters are not
pushed about by noise between its visits.
"""

import functools
import warnings
from operator import attrgetter

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from pyro.infer.autoguide.utils import deep_setattr
from torch.distributions import biject_to
from torch.distributions.transforms import AffineTransform

from ..item_chunks import item_subsamples
from .item_flows import PER_ITEM_CONTEXT, check_items_are_events, item_flow, on_item_vectors
from .local_gaussian import PathDerivativeGaussian, gaussian_prior, item_gaussian
from .pseudo_observations import Amortized, PerItem, check_given_features, full_size_value, plate_features
from .sites import check_locals_in_subsampled_plate, local_subsampled_plate

class LocalPosterior(PyroModule):
    r"""The local sites' posteriors (see the module's docstring), their pseudo-observations from
    ``pseudo_observations`` (:class:`~vi_flows.autoflow.pseudo_observations.PerItem` for
    ``mode="per-item"``, :class:`~vi_flows.autoflow.pseudo_observations.Amortized` for ``"amortized"``).

    Called with the globals' values (one dict, drawn by the global guide, any particle dimensions
    leading), it runs the model with those values and, at each local site, samples from the
    conditional posterior there; only the local sites and the plates' subsample sites reach the
    enclosing trace. Returns ``{local site: value}``. An amortised posterior first runs the model
    once more, with the locals from their priors, to read the subsample's data.

    :param model: the model, as the user wrote it.
    :param trace: a trace of the model at the initial point.
    :param dict local: ``{local site: the plates that make it local}``.
    :param str flow: a flow spec for a local flow per item (None: the Gaussian alone), built with
        ``flow_options`` as :func:`~vi_flows.build_flow` takes them.
    :param dict features: ``{plate: (N, F) tensor}``, what an amortised encoder reads of each item
        of the plate instead of its observed sites' values.
    """

    def __init__(self, model, trace, local, mode="per-item", flow=None, flow_options=None, features=None):
        super().__init__()
        self._model = (model,)  # not a submodule: the model's parameters are the model's
        self.names = tuple(local)
        self.supports = {name: trace.nodes[name]["fn"].support for name in self.names}
        self.event_dims = {name: trace.nodes[name]["fn"].event_dim for name in self.names}
        self.full_shapes = {name: full_size_value(trace.nodes[name]).shape for name in self.names}
        # Each latent site's number of batch dimensions, to put draws left of every plate.
        self.batch_dims = {name: site["value"].dim() - site["fn"].event_dim for name, site in trace.iter_stochastic_nodes() if not site_is_subsample(site)}
        self.plate_depth = max((-frame.dim for site in trace.nodes.values() for frame in site.get("cond_indep_stack", ())), default=0)
        self.local_plates = {plate for plates in local.values() for plate in plates}
        self.subsampled = local_subsampled_plate(trace, self.local_plates)
        check_locals_in_subsampled_plate(trace, local, self.subsampled)
        if mode == "amortized":
            self.data_plates = sorted({plate for name in self.names for plate in _one_plate(name, local[name])})
            self.given_features = check_given_features(features or {}, trace, self.data_plates)
            features = self.item_features(trace)
            self.pseudo_observations = Amortized(trace, self.names, features, local)
            if flow is not None:
                check_items_are_events(trace, self.names, self.pseudo_observations.per_item_shapes)
        else:
            self.data_plates, self.given_features = (), {}
            self.pseudo_observations = PerItem(trace, self.names, context_dim=None if flow is None else PER_ITEM_CONTEXT)
        self.flow_spec = flow
        if flow is not None:
            for name in self.names:
                deep_setattr(self, "flows." + name, item_flow(trace.nodes[name], flow, flow_options, self.pseudo_observations.context_dim))
        self.mean_field = [name for name in self.names if gaussian_prior(trace.nodes[name]["fn"]) is None]
        if self.mean_field:
            warnings.warn(
                f"local sites {self.mean_field} have priors that are not Gaussian in unconstrained space, so their "
                "posteriors do not follow the globals: each item is fitted mean-field (independent of the globals)."
            )

    @property
    def model(self):
        return self._model[0]

    def conditional(self, name, prior, features=None):
        """Item-wise posterior of local site ``name`` given the values its ``prior`` was built from
        (and, amortised, ``{plate: (items, F)}`` features of the current items)."""
        loc, precision = self.pseudo_observations(name, features)
        to_support = biject_to(prior.support).with_cache()
        event_dim = to_support.domain.event_dim
        item_loc, item_scale = item_gaussian(prior, loc, precision)
        if self.flow_spec is None:
            detached = dist.Normal(*item_gaussian(prior, loc.detach(), precision.detach())).to_event(event_dim)
            return PathDerivativeGaussian(dist.Normal(item_loc, item_scale).to_event(event_dim), to_support, detached)
        # The flow works on standardised coordinates, so that every family, rotations included,
        # starts at the Gaussian the items started at.
        flow = attrgetter(name)(self.flows).condition(self.pseudo_observations.context(name, features))
        standard = dist.Normal(torch.zeros_like(item_loc), torch.ones_like(item_scale)).to_event(event_dim)
        # Every part caches its last pair, so that scoring a fresh draw walks back through the caches
        # to the flow's own cache instead of running its (for some families iterative) inverse.
        to_gaussian = AffineTransform(item_loc, item_scale, event_dim=event_dim, cache_size=1)
        return dist.TransformedDistribution(standard, [*on_item_vectors(flow, standard.event_shape), to_gaussian, to_support])

    def item_features(self, trace):
        """``{plate: (items, F)}``: what the encoders read of the items of a model run's subsample."""
        return plate_features(trace, self.data_plates, self.plate_depth, self.given_features)

    def evidence(self, name, prior, features=None):
        """``log N(a; m, s^2 + 1/beta)`` per coordinate of the current items of local site ``name``
        (shaped as its value): the log-likelihood of the globals behind ``prior`` that its
        pseudo-observations stand for, the site integrated out; None for a prior that is not Gaussian."""
        gaussian = gaussian_prior(prior)
        if gaussian is None:
            return None
        loc, precision = self.pseudo_observations(name, features)
        prior_loc, prior_scale = gaussian
        return dist.Normal(prior_loc, (prior_scale.pow(2) + precision.reciprocal()).sqrt()).log_prob(loc)

    def forward(self, global_values, *args, indices=None, drawn_plates=None, **kwargs):
        """``drawn_plates``: ``{plate: indices}`` an enclosing guide has drawn and recorded (an
        ``AutoGuideList`` draws its parts' plates): the model's plates take them, unrecorded."""
        drawn_plates = drawn_plates or {}
        trace = self._run(global_values, {}, {**(indices or {}), **drawn_plates}, *args, unrecorded=drawn_plates, **kwargs)
        return {name: trace.nodes[name]["value"] for name in self.names}

    def _run(self, global_values, local_values, indices, *args, evidence=None, unrecorded=(), **kwargs):
        """The trace of one model run with the globals, any ``local_values`` and any plates' subsample
        ``indices`` given, the locals drawn from their posteriors; with an ``evidence`` dict, each
        local site's :meth:`evidence` goes in it. The subsample sites of the plates in ``unrecorded``
        do not reach the enclosing trace."""
        features = None
        if self.data_plates:  # the subsample's data, with the locals from their priors; the plates draw
            # their subsamples here, through the handlers outside (fit's O(B) draw), recorded once
            data_hidden = functools.partial(_hidden, local=(), unrecorded=unrecorded)
            with poutine.block(hide_fn=data_hidden), poutine.trace() as data_run, LocalSampler(None, global_values, local_values, indices):
                self.model(*args, **kwargs)
            indices = {plate: data_run.trace.nodes[plate]["value"] for plate in self.subsampled}
            features = self.item_features(data_run.trace)
            unrecorded = set(unrecorded) | {name for name, site in data_run.trace.nodes.items() if site_is_subsample(site)}
        hidden = functools.partial(_hidden, local=set(self.names), unrecorded=unrecorded)
        with poutine.block(hide_fn=hidden), poutine.trace() as capture, LocalSampler(self, global_values, local_values, indices, features, evidence):
            self.model(*args, **kwargs)
        return capture.trace

    @torch.no_grad()
    def log_prob(self, global_draws, local_draws, *args, **kwargs):
        """The local sites' log density under the guide at given draws (``{site: (S, *site_shape)}``,
        globals and locals), one per draw; a subsampled plate's items a subsample at a time."""
        _, subsampled = self._items_of_run(global_draws, *args, **kwargs)
        global_values = {name: self.left_of_plates(name, value) for name, value in global_draws.items()}
        if not subsampled:
            return self._log_prob_of_run(global_values, local_draws, {}, None, args, kwargs)
        ((plate, frame),) = subsampled.items()
        total = 0.0
        for indices, kept in item_subsamples(frame):
            # Each site's draws (S, *shape): the plate's axis is frame.dim from the right of the batch shape.
            chunk = {name: draws.index_select(draws.dim() - self.event_dims[name] + frame.dim, indices) for name, draws in local_draws.items() if name in self.names}
            total = total + self._log_prob_of_run(global_values, chunk, {plate: indices}, (frame, kept), args, kwargs)
        return total

    def _log_prob_of_run(self, global_values, local_draws, indices, kept, args, kwargs):
        """One run's part of :meth:`log_prob`; with ``kept = (frame, count)``, over the plate's first ``count`` items."""
        num_draws = len(local_draws[self.names[0]])
        local_values = {name: self.left_of_plates(name, local_draws[name]) for name in self.names}
        with pyro.plate("_draws", num_draws, dim=-self.plate_depth - 1):
            trace = self._run(global_values, local_values, indices, *args, **kwargs)
        total = 0.0
        for name in self.names:
            log_prob = trace.nodes[name]["fn"].log_prob(trace.nodes[name]["value"])
            if kept is not None:
                log_prob = log_prob.narrow(log_prob.dim() + kept[0].dim, 0, kept[1])
            total = total + log_prob.reshape(num_draws, -1).sum(-1)
        return total

    def left_of_plates(self, name, draws):
        """Draws ``(S, *site_shape)`` of a site with their draw dimension left of every plate of the model."""
        return draws.reshape(draws.shape[:1] + (1,) * (self.plate_depth - self.batch_dims[name]) + draws.shape[1:])

    @torch.no_grad()
    def draw(self, num_draws, global_draws, reduce, *args, **kwargs):
        """``{local site: reduce(draws)}`` over all items of the model run ``model(*args, **kwargs)``
        (which may hold other items than the fit's: an amortised posterior reads new data), where
        ``global_draws`` are the globals' ``num_draws`` draws (``{site: (num_draws, *site_shape)}``) and
        ``reduce(site, draws)`` maps a site's ``(S, *shape)`` draws given them to a tensor of any
        leading size (the identity, or quantiles over the draws). A subsampled plate is run a
        subsample at a time, so memory follows the subsample, not the items."""
        shapes, subsampled = self._items_of_run(global_draws, *args, **kwargs)
        values = {name: self.left_of_plates(name, value) for name, value in global_draws.items()}
        with pyro.plate("_draws", num_draws, dim=-self.plate_depth - 1):
            if not subsampled:
                return {name: reduce(name, value.reshape((num_draws,) + shapes[name])) for name, value in self(values, *args, **kwargs).items()}
            ((plate, frame),) = subsampled.items()
            result, start = {}, 0
            for indices, kept in item_subsamples(frame):
                chunk = self(values, *args, indices={plate: indices}, **kwargs)
                for name, value in chunk.items():
                    dim, shape = frame.dim - self.event_dims[name], shapes[name]
                    value = reduce(name, value.reshape((num_draws,) + shape[:dim] + (frame.size,) + shape[len(shape) + dim + 1 :]))
                    if name not in result:
                        result[name] = value.new_empty(value.shape[:1] + shapes[name])
                    result[name].narrow(dim, start, kept).copy_(value.narrow(dim, 0, kept))
                start += kept
            return result

    def _items_of_run(self, global_draws, *args, **kwargs):
        """``({local site: its shape over all items}, {plate: frame} subsampled)`` of this model run,
        traced with the locals from their priors at the globals' first draw."""
        first = {name: value[0] for name, value in global_draws.items()}
        with poutine.block(), poutine.trace() as probe, LocalSampler(None, first, {}, {}):
            self.model(*args, **kwargs)
        return {name: full_size_value(probe.trace.nodes[name]).shape for name in self.names}, local_subsampled_plate(probe.trace, self.local_plates)


class LocalSampler(Messenger):
    """Inside the model: the globals and the plates' subsamples take the given values; local sites
    sample from their posteriors (from their priors without a ``posterior``) or take given values."""

    def __init__(self, posterior, global_values, local_values, indices, features=None, evidence=None):
        super().__init__()
        self.posterior, self.global_values, self.local_values = posterior, global_values, local_values
        self.indices, self.features, self.evidence = indices, features, evidence

    def _pyro_sample(self, msg):
        name = msg["name"]
        if site_is_subsample(msg):
            if name in self.indices:
                msg["value"] = self.indices[name]
        elif msg["is_observed"]:
            return
        elif name in self.global_values:
            msg["value"], msg["is_observed"] = self.global_values[name], True
        elif name in self.local_values:
            msg["value"] = self.local_values[name]
        if self.posterior is not None and name in self.posterior.names:
            evidence = self.posterior.evidence(name, msg["fn"], self.features) if self.evidence is not None else None
            if evidence is not None:
                self.evidence[name] = evidence
            msg["fn"] = self.posterior.conditional(name, msg["fn"], self.features)


def _hidden(msg, local, unrecorded):
    """Whether a model run hides ``msg`` from the enclosing trace: every sample site but the ``local``
    ones, and the subsample sites of the plates in ``unrecorded``."""
    if msg["type"] != "sample":
        return False
    return msg["name"] in unrecorded if site_is_subsample(msg) else msg["name"] not in local


def _one_plate(name, plates):
    if len(plates) != 1:
        raise ValueError(
            f"local site {name!r} is local in the plates {list(plates)}; an amortised posterior reads one plate's "
            "items' data. Use local='per-item' for it."
        )
    return plates
