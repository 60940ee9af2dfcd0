"""``AutoFlow``: a registered flow as the posterior of any Pyro model."""

import functools

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import LowerCholeskyAffine
from pyro.distributions.util import eye_like
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.guides import prototype_hide_fn
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from torch import nn
from torch.distributions import ComposeTransform, biject_to

from .. import pyro_internals
from .. import draws
from ..registry import build_flow, check_flow_options
from .base import BASES
from .initialization import INITS, InitWithFallback, start
from .local import LocalPosterior
from .local_initialization import start_locals
from .noncentring import non_centring_of
from .posterior import FlowPosterior, path_derivative
from .sites import check_latent_sites, local_sites, subsampled_plates
from .subsampled_fit import SubsampledFitting

# Chosen by measurement with the default fit on the zoo's exact models (RESULTS.md, "Choosing a flow"):
# planar layers keep both modes of a mixture, the IAF layers fit the funnel's neck; four of them
# rather than two keep the banana's sd within 10% on every seed measured.
DEFAULT_FLOW = "planar*8+iaf*4"
LOCAL_MODES = ("auto", "per-item", "amortized", "none")
# local="auto" gives local sites their own posteriors from this many local coordinates on (or where a
# plate is subsampled). The global flow fits hierarchical_100 (100 local coordinates) within the zoo
# tests' tolerances; at 1000 its default fit diverged and at 10^4 it ran out of memory (issue 19).
LOCAL_MIN_DIM = 200


class AutoFlow(SubsampledFitting, AutoContinuous):
    r"""A normalizing-flow posterior over all continuous latents of a Pyro model.

    Latents are packed into one unconstrained vector by Pyro's ``AutoContinuous``; the guide is

    .. math:: \theta = N\big(c + P\,(\mu + \sigma \odot f(B\varepsilon))\big), \qquad \varepsilon \sim \mathcal N(0, I),

    where :math:`f` is the flow that ``flow`` names (a registered name or a spec such as
    ``"householder*4+planar*8"``); :math:`B` is the identity (``base="standard"``), a learnable
    diagonal (``"diagonal"``) or a learnable lower-triangular matrix (``"fullrank"``), starting at
    the identity; :math:`\mu` (from 0) and :math:`\sigma` are learnable; the centre :math:`c` and
    lower-triangular preconditioner :math:`P` are fixed by the initialisation, so an optimiser step
    means the same in every direction however different the posterior's scales are; and :math:`N`
    is the identity or, for a model with hierarchical latents, a
    :class:`~vi_flows.autoflow.noncentring.PartialNonCentring` (see ``non_centring``).

    Initialisation (``init``):

    - ``"prior"``: :math:`c` at ``init_loc_fn``'s point, :math:`P = I`, :math:`\sigma` = ``init_scale``.
    - ``"laplace"``: :math:`c` at the mode of the model's density in unconstrained space (L-BFGS),
      :math:`P` the Cholesky factor of the Laplace covariance, :math:`\sigma = 1`. Flows start near
      the identity, so the guide starts at the Laplace approximation (passed through the
      non-centring map, re-linearised at the mode) and the flow learns what is not Gaussian. Falls
      back to ``"prior"`` with a warning where the search diverges or the Hessian is not positive definite.
    - ``"auto"`` (default): both, keeping the one with the higher ELBO (32 draws), and the prior
      point without a warning where the Laplace fit fails. A Laplace fit is poor where the mode is
      unrepresentative, as in Neal's funnel; ``init_used`` says which start was kept.

    :param callable model: a Pyro model.
    :param str flow: a flow spec, see :func:`vi_flows.build_flow`.
    :param str base: ``"standard"``, ``"diagonal"`` or ``"fullrank"``.
    :param str init: ``"auto"``, ``"laplace"`` or ``"prior"``.
    :param callable init_loc_fn: per-site initialisation (as in Pyro); sites it cannot sample,
        such as ``ImproperUniform``, start at the origin of unconstrained space.
    :param float init_scale: initial :math:`\sigma` of the ``"prior"`` initialisation.
    :param bool non_centring: where a latent's prior scale follows earlier latents (a centred
        hierarchy's ``theta ~ Normal(mu, tau)``, Neal's funnel), end the guide with a partial
        non-centring of it, linearised from the prior at the start
        (:func:`~vi_flows.autoflow.noncentring.linearise_prior`): the flow then works in non-centred
        coordinates, while the guide still emits the model's own sites. Each child is non-centred by
        the prior's share of its curvature: fully where no data touch it, hardly where data pin it
        down. Models without such latents are unaffected.
    :param str local: the latents of plates that hold data or are subsampled
        (:func:`~vi_flows.autoflow.sites.local_sites`): with ``"per-item"`` each item gets its own
        Gaussian posterior, conditioned on the globals drawn in the same particle
        (:class:`~vi_flows.autoflow.local.LocalPosterior`), started at each item's likelihood,
        Laplace-approximated (:mod:`~vi_flows.autoflow.local_initialization`), and the flow covers
        the global latents only (its Laplace start integrates the locals out against their
        pseudo-observations; ``"auto"`` keeps it without comparing ELBOs); ``"amortized"`` is
        the same posterior with each item's parameters computed by a network from the item's data
        (the observed sites in its plate), not stored per item; with ``"none"`` the
        flow covers every latent, and a subsampled plate of latents is an error; ``"auto"``
        (default) is ``"per-item"`` where a plate of latents is subsampled or the local latents have
        ``LOCAL_MIN_DIM`` = 200 coordinates or more, else ``"none"``. ``local_sites`` names them.
        Where every latent is local (a variational autoencoder), there is no global flow
        (``latent_dim`` is 0): the items' posteriors, with ``local_flow``, are the guide.
    :param str local_flow: a flow spec (e.g. ``"sylvester*4"``) applied per item after the local
        Gaussian, its parameters a function of the item
        (:class:`~vi_flows.flows.conditional.ConditionalFlow`): of the item's data (encoder) when
        amortised, of a learned row per item otherwise. None (default): the Gaussian alone.
    :param dict local_flow_options: options of the local flow, as :func:`vi_flows.build_flow` takes them.
    :param dict local_features: with ``local="amortized"``, ``{plate: tensor}`` of one row (or one
        number) per item of the plate, in its order: what the encoder reads of each item instead of
        the values of the observed sites in its plate (say, a known measurement error).
    :param str name: the prefix of the guide's names in Pyro's param store; two guides of one name
        in one store read the same parameters (a clear error where their shapes differ).
    :param flow_options: passed to :func:`vi_flows.build_flow`, checked against the flows' own.

    The path-derivative gradient ("sticking the landing") is an option of the objective, not of
    the guide: :func:`vi_flows.fit` takes ``sticking_the_landing``.

    Example::

        guide = AutoFlow(model, flow="iaf*2")
        svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    """

    def __init__(
        self,
        model,
        flow: str = DEFAULT_FLOW,
        base: str = "diagonal",
        init: str = "auto",
        init_loc_fn=init_to_median,
        init_scale: float = 0.1,
        non_centring: bool = True,
        local: str = "auto",
        local_flow: str | None = None,
        local_flow_options: dict | None = None,
        local_features: dict | None = None,
        name: str = "AutoFlow",
        **flow_options,
    ):
        if base not in BASES:
            raise ValueError(f"base must be one of {', '.join(map(repr, BASES))}, got {base!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
        if local not in LOCAL_MODES:
            raise ValueError(f"local must be one of {', '.join(map(repr, LOCAL_MODES))}, got {local!r}")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale!r}")
        check_flow_options(flow, flow_options, owner="AutoFlow")
        if local_flow is not None:
            if local == "none":
                raise ValueError("local_flow is a flow over each local item, and local='none' gives no item its own posterior")
            check_flow_options(local_flow, local_flow_options or {}, owner="AutoFlow's local_flow")
        if local_features is not None and local != "amortized":
            raise ValueError(f"local_features are what an amortised encoder reads: pass local='amortized' with them (got local={local!r})")
        self.local_flow, self._local_flow_options = local_flow, dict(local_flow_options or {})
        self._local_features = local_features
        self.flow_spec, self.base_kind, self.init = flow, base, init
        self._init_scale = float(init_scale)
        self._use_non_centring = bool(non_centring)
        self._flow_options = flow_options
        self.init_used = None  # "prior" or "laplace", once the guide has been set up
        self.local_mode, self.local_sites, self._user_model = local, (), (model,)
        super().__init__(model, init_loc_fn=InitWithFallback(init_loc_fn))
        pyro_internals.name_module(self, name)
        self.non_centring = None  # a PartialNonCentring, once set up, for a model with scale parents
        self.locals = None  # a LocalPosterior, once set up, for a model with local sites

    def setup(self, *args, **kwargs):
        """Set the guide up for the model's arguments, as its first call would (idempotent)."""
        return pyro_internals.setup(self, *args, **kwargs)

    def _setup_prototype(self, *args, **kwargs):
        trace = poutine.block(poutine.trace(self.model).get_trace)(*args, **kwargs)
        self.local_sites = self._choose_local_sites(trace)
        if self._local_features is not None and not self.local_sites:
            raise ValueError("local_features are read for local latents, and the model has none (no latent in a plate that holds data or is subsampled)")
        if self.local_sites:
            self._prototype_hide_fn = functools.partial(_hide_sites, frozenset(self.local_sites))
        try:
            pyro_internals.setup_continuous_prototype(self, *args, allow_empty=bool(self.local_sites), **kwargs)
        except Exception:
            # Pyro fails on these later and less clearly; say what is wrong with the model instead.
            if self.prototype_trace is not None:
                check_latent_sites(self.prototype_trace, has_locals=bool(self.local_sites))
            raise
        check_latent_sites(self.prototype_trace, has_locals=bool(self.local_sites))
        # With every latent local, an empty global vector, on the model's device.
        centre = self._init_loc() if self.latent_dim else trace.nodes[self.local_sites[0]]["value"].new_zeros(0)
        self.register_buffer("centre", centre)
        self.register_buffer("preconditioner", eye_like(centre, self.latent_dim))
        self.loc = nn.Parameter(torch.zeros_like(centre))
        self.scale = PyroParam(torch.full_like(centre, self._init_scale), constraints.softplus_positive)
        self.base = BASES[self.base_kind](centre)
        # Every latent local: no global coordinate for a flow to act on, the items' posteriors are the guide.
        self.flow = build_flow(self.flow_spec, self.latent_dim, **self._flow_options).to(centre) if self.latent_dim else None
        if self._use_non_centring and self.latent_dim:
            self.non_centring = non_centring_of(self, *args, **kwargs)
        if self.local_sites:
            plates = {name: plates for name, plates in local_sites(trace).items() if name in self.local_sites}
            mode = "amortized" if self.local_mode == "amortized" else "per-item"
            self.locals = LocalPosterior(self._user_model[0], trace, plates, mode, self.local_flow, self._local_flow_options, self._local_features)
            start_locals(self, *args, **kwargs)
        pyro_internals.check_param_store(self)
        # Runs inside whatever SVI step asked for the first sample: hide it from that trace.
        with poutine.block(), torch.enable_grad():
            self.init_used = start(self, self.init, *args, **kwargs)

    def _choose_local_sites(self, trace):
        """The local sites to give their own posteriors, as ``local`` says (see the class docstring)."""
        local = local_sites(trace)
        if self.local_mode == "none" or not local:
            return ()
        if self.local_mode == "auto":
            size = sum(biject_to(trace.nodes[name]["fn"].support).inv(trace.nodes[name]["value"]).numel() for name in local)
            if size < LOCAL_MIN_DIM and not subsampled_plates(trace):
                return ()
        return tuple(local)

    def forward(self, *args, **kwargs):
        self.setup(*args, **kwargs)
        values = super().forward(*args, **kwargs) if self.latent_dim else {}
        if self.locals is not None:
            # A part of an AutoGuideList: the list has drawn (and recorded) every plate's subsample.
            plates = getattr(self.master(), "plates", {}) if self.master is not None else {}
            drawn = {name: plate.indices for name, plate in plates.items()}
            values.update(self.locals(values, *args, drawn_plates=drawn, **kwargs))
        return values

    def item_tables(self):
        """The local posteriors' per-item tables, which ``fit`` steps lazily (:mod:`~vi_flows.item_steps`)."""
        tables = getattr(getattr(self.locals, "pseudo_observations", None), "tables", None)
        return tables() if tables is not None else []

    def recentre(self, centre, preconditioner, *args, **kwargs):
        """Start from ``centre`` with the lower-triangular ``preconditioner`` and :math:`\\sigma = 1`
        (a Laplace approximation), re-linearising the non-centring there."""
        with torch.no_grad():
            self.centre.copy_(centre)
            self.preconditioner.copy_(preconditioner)
            self.scale = torch.ones_like(centre)
        if self.non_centring is not None:
            self.non_centring = non_centring_of(self, *args, **kwargs)

    def get_base_dist(self):
        return dist.Normal(torch.zeros_like(self.loc), torch.ones_like(self.loc)).to_event(1)

    def _outer(self):
        # c + P (mu + sigma * x) as one affine map.
        return LowerCholeskyAffine(self.centre + self.preconditioner @ self.loc, self.preconditioner * self.scale, cache_size=1)

    def get_transform(self, *args, **kwargs):
        # Every part caches its last (input, output) pair, so scoring a fresh sample walks back
        # through the cache instead of running the flow's (iterative) inverse.
        return ComposeTransform(self._parts(self._outer()))

    def _parts(self, outer):
        parts = [self.base.transform(), self.flow, outer, self.non_centring]
        return [part for part in parts if part is not None]

    def get_posterior(self, *args, **kwargs):
        outer = self._outer()
        derivative = functools.partial(path_derivative, base=self.base, flow=self.flow, outer=outer, non_centring=self.non_centring)
        return FlowPosterior(self.get_base_dist(), ComposeTransform(self._parts(outer)), derivative)

    def sample_constrained(self, num_samples, *args, **kwargs):
        """Draw ``num_samples`` from the guide: ``{site: tensor of shape (num_samples, *site_shape)}``."""
        return draws.sample_constrained(self, num_samples, *args, **kwargs)

    def quantiles(self, quantiles, *args, **kwargs):
        """Posterior quantiles of each latent site, in its support and the same on every call
        (:func:`vi_flows.draws.quantiles`): ``{site: tensor of shape (len(quantiles), *site_shape)}``."""
        return draws.quantiles(self, quantiles, *args, **kwargs)

    @torch.no_grad()
    def median(self, *args, **kwargs):
        """The posterior median of each latent site (see :meth:`quantiles`): ``{site: value}``."""
        return {name: values[0] for name, values in self.quantiles([0.5], *args, **kwargs).items()}


def _hide_sites(names, msg):
    # The global prototype: Pyro's hidden sites and the local ones.
    return prototype_hide_fn(msg) or msg["name"] in names
