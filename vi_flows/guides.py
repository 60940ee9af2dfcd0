"""``AutoFlow``: a registered flow as the posterior of any Pyro model."""

import contextlib
import contextvars
import functools
import math
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import AffineTransform, LowerCholeskyAffine
from pyro.distributions.util import eye_like
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoContinuous, AutoLaplaceApproximation
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from torch import nn
from torch.distributions import ComposeTransform, biject_to

from .flows.base import flow_jacobian
from .noncentring import PartialNonCentring, chain_depth, linearise_prior
from .registry import build_flow, parse_spec

BASES = ("standard", "diagonal", "fullrank")
INITS = ("auto", "laplace", "prior")
# Draws behind init="auto"'s choice between the prior point and the Laplace fit.
INIT_ELBO_PARTICLES = 32

# Chosen by measurement with the default fit on the zoo's exact models (README, "Choosing a flow"):
# planar layers keep both modes of a mixture, the IAF layers fit the funnel's neck; four of them
# rather than two keep the banana's sd within 10% on every seed measured (python -m vi_flows.bench choose).
DEFAULT_FLOW = "planar*8+iaf*4"

# Inside fit, sticking_the_landing="auto" uses the path-derivative gradient up to this many latent
# dimensions. Measured with fit's compiled step, 64 particles (python -m vi_flows.bench stl): a step
# costs 2.2x / 2.9x / 4.4x / 15.3x the plain one at D = 2 / 10 / 20 / 50 (the flow's D x D Jacobian).
STICKING_THE_LANDING_MAX_DIM = 20
_TRACE_ELBO_OBJECTIVE = contextvars.ContextVar("trace_elbo_objective", default=False)


@contextlib.contextmanager
def trace_elbo_objective():
    """Declare that guides are being fitted by a ``Trace_ELBO``-type objective, for which the
    path-derivative gradient is unbiased (``fit`` does): ``AutoFlow(sticking_the_landing="auto")``
    then uses it. Outside, an objective such as ``RenyiELBO`` may be in use, and "auto" does not."""
    token = _TRACE_ELBO_OBJECTIVE.set(True)
    try:
        yield
    finally:
        _TRACE_ELBO_OBJECTIVE.reset(token)


def transform_fn(spec, **flow_kwargs):
    """Return an ``init_transform_fn`` for Pyro's own ``AutoNormalizingFlow``.

    Example::

        guide = pyro.infer.autoguide.AutoNormalizingFlow(model, vi_flows.transform_fn("planar*8"))
    """
    parse_spec(spec)
    return functools.partial(build_flow, spec, **flow_kwargs)


def check_latent_sites(trace):
    """Raise a ``ValueError`` for latent sites a single global continuous guide cannot represent."""
    latent_sites = list(trace.iter_stochastic_nodes())
    if not latent_sites:
        raise ValueError(
            "the model has no latent sample site (every site is observed or a pyro.factor), so "
            "there is no posterior to approximate; use an empty guide, e.g. `lambda *args, **kwargs: None`"
        )
    for name, site in latent_sites:
        if site["fn"].support.is_discrete:
            raise ValueError(
                f"latent site {name!r} is discrete ({type(site['fn']).__name__}); AutoFlow models continuous "
                "latents only. Enumerate it out (pyro.infer.config_enumerate with TraceEnum_ELBO) and hide it "
                f"from this guide, e.g. AutoFlow(poutine.block(model, hide=[{name!r}])), or combine guides "
                "with pyro.infer.autoguide.AutoGuideList."
            )
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.full_size is not None and frame.size != frame.full_size:
                raise ValueError(
                    f"latent site {name!r} lies in plate {frame.name!r}, subsampled to {frame.size} of "
                    f"{frame.full_size}; a global guide would learn one value per subsample slot, not one per "
                    "data point, and silently mix different points' posteriors. Do not subsample plates that "
                    "hold local latents, or give those latents their own local (amortised) guide through "
                    "AutoGuideList."
                )


def laplace_approximation(model, init_loc_fn, *args, max_iter=1000, **kwargs):
    """MAP point and Laplace approximation of ``model`` in unconstrained space.

    Returns ``(loc, scale, correlation_tril)`` (standard deviations and the Cholesky factor of
    the correlation matrix). Raises ``ValueError`` saying why where the MAP search diverges or
    the Hessian there is not positive definite.
    """
    with pyro.get_param_store().scope():
        delta = AutoLaplaceApproximation(model, init_loc_fn=init_loc_fn)
        delta(*args, **kwargs)
        elbo = Trace_ELBO()
        optimizer = torch.optim.LBFGS([delta.loc], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = elbo.differentiable_loss(model, delta, *args, **kwargs)
            loss.backward()
            return loss

        try:
            optimizer.step(closure)
            if not torch.isfinite(delta.loc).all():
                raise ValueError("the MAP search diverged")
            gaussian = delta.laplace_approximation(*args, **kwargs)
            laplace = (gaussian.loc, gaussian.scale, gaussian.scale_tril)
            if not all(torch.isfinite(part).all() for part in laplace):
                raise ValueError("the Laplace covariance is not finite")
        # cholesky raises RuntimeError subclasses; torch's strong-Wolfe line search can raise
        # IndexError when the loss turns NaN inside a bracket.
        except (ValueError, RuntimeError, IndexError) as failure:
            reason = str(failure).splitlines()[0] if str(failure) else type(failure).__name__
            raise ValueError(f"Laplace initialisation failed ({reason})") from failure
    return laplace


@torch.no_grad()
def sample_constrained(guide, num_samples, *args, **kwargs):
    """Draw ``num_samples`` from any Pyro ``AutoContinuous`` guide, in the model's constrained space.

    Returns ``{site: tensor of shape (num_samples, *site_shape)}``. Unlike ``Predictive`` this never
    runs the model, so it works for models with ``ImproperUniform`` sites.
    """
    if guide.prototype_trace is None:
        guide._setup_prototype(*args, **kwargs)
    latent = guide.get_posterior(*args, **kwargs).sample((num_samples,))
    # Pyro unpacks draws that sit left of every plate dimension.
    plate_depth = max((-frame.dim for frame in guide._prototype_frames.values()), default=0)
    latent = latent.reshape((num_samples,) + (1,) * plate_depth + latent.shape[-1:])
    return {
        site["name"]: biject_to(site["fn"].support)(unconstrained).reshape((num_samples,) + site["value"].shape)
        for site, unconstrained in guide._unpack_latent(latent)
    }


@torch.no_grad()
def guide_moments(guide, num_draws, *args, chunk_size=1_000_000, **kwargs):
    """Mean and sd of every element of every latent site under an ``AutoContinuous`` guide, from
    ``num_draws`` draws taken ``chunk_size`` at a time and pooled in float64 (Chan, Golub & LeVeque's
    update), so that more draws than fit in memory can be used: a heavy-tailed posterior needs them
    (the funnel's x has kurtosis 3 exp(9); the sd of 10^6 exact draws is up to 15% off, of 10^7 3%).

    Returns ``{site: (mean, sd)}``, each of the site's shape, as :func:`~vi_flows.diagnostics.moment_errors` takes them.
    """
    pooled, seen = {}, 0
    while seen < num_draws:
        size = min(chunk_size, num_draws - seen)
        for name, values in sample_constrained(guide, size, *args, **kwargs).items():
            values = values.double()
            mean, sum_of_squares = values.mean(0), ((values - values.mean(0)) ** 2).sum(0)
            if name in pooled:
                pooled_mean, pooled_squares = pooled[name]
                delta = mean - pooled_mean
                mean = pooled_mean + delta * size / (seen + size)
                sum_of_squares = pooled_squares + sum_of_squares + delta**2 * seen * size / (seen + size)
            pooled[name] = mean, sum_of_squares
        seen += size
    return {name: (mean, (sum_of_squares / (num_draws - 1)).sqrt()) for name, (mean, sum_of_squares) in pooled.items()}


@torch.no_grad()
def log_density_at(guide, draws, *args, **kwargs):
    """The guide's log density at given points of the model's constrained space, one per draw.

    ``draws`` maps every latent site to values of shape ``(N, *site_shape)`` (reference draws,
    say). Each is mapped to unconstrained space, packed as Pyro packs it, scored by the guide's
    posterior (a flow runs its exact inverse) and corrected by the Jacobian of the map. A guide
    that misses a region of the posterior scores the draws from there badly.
    """
    if guide.prototype_trace is None:
        guide._setup_prototype(*args, **kwargs)
    parts, log_jacobian = [], 0.0
    for name, site in guide.prototype_trace.iter_stochastic_nodes():
        value = draws[name]
        to_unconstrained = biject_to(site["fn"].support).inv
        unconstrained = to_unconstrained(value)
        log_jacobian = log_jacobian + to_unconstrained.log_abs_det_jacobian(value, unconstrained).reshape(len(value), -1).sum(-1)
        parts.append(unconstrained.reshape(len(value), -1))
    packed = torch.cat(parts, -1)
    return guide.get_posterior(*args, **kwargs).log_prob(packed) + log_jacobian


def _nan_as_minus_inf(value):
    return -math.inf if math.isnan(value) else value


def _unconstrained_zero(site):
    """The constrained image of the unconstrained origin, for sites that cannot be sampled."""
    fn = site["fn"]
    to_support = biject_to(fn.support)
    return to_support(torch.zeros(to_support.inverse_shape(fn.shape())))


class _WithUnconstrainedFallback:
    """``init_loc_fn``, except that sites it cannot sample (``ImproperUniform``) start at the
    unconstrained origin instead of failing, as Pyro's ``init_to_feasible`` does. A class rather
    than a closure, so that a guide can be pickled whole (``torch.save(guide, path)``)."""

    def __init__(self, init_loc_fn):
        self.init_loc_fn = init_loc_fn

    def __call__(self, site):
        try:
            return self.init_loc_fn(site)
        except NotImplementedError:
            return _unconstrained_zero(site)


class FlowPosterior(dist.TransformedDistribution):
    """The distribution of ``AutoFlow``'s latent vector: a transformed standard normal that remembers
    its latest reparameterised draw.

    With a ``path_derivative`` (see ``AutoFlow``'s ``sticking_the_landing``), ``log_prob`` at that
    draw keeps its value but takes its gradient from ``path_derivative(noise, draw)`` (zero-valued,
    differentiable only through the draw) instead of from the parameters directly.
    """

    def __init__(self, base_dist, transforms, path_derivative=None, validate_args=None):
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

    def log_prob(self, value):
        log_q = super().log_prob(value)
        if self.path_derivative is None or self._last_draw is None or not torch.is_grad_enabled():
            return log_q
        noise, draw = self._last_draw
        if value is not draw:
            return log_q
        return log_q.detach() + self.path_derivative(noise, draw)


class AutoFlow(AutoContinuous):
    r"""A normalizing-flow posterior over all continuous latents of a Pyro model.

    Latents are packed into one unconstrained vector by Pyro's ``AutoContinuous``; the guide is

    .. math:: \theta = c + P\,(\mu + \sigma \odot f(B\varepsilon)), \qquad \varepsilon \sim \mathcal N(0, I),

    followed, for a model with hierarchical latents, by :class:`~vi_flows.noncentring.PartialNonCentring`
    (see ``non_centring``), where :math:`f` is the flow that ``flow`` names (a registered name or a spec such as
    ``"householder*4+planar*8"``); :math:`B` is the identity (``base="standard"``), a learnable
    diagonal (``"diagonal"``) or a learnable lower-triangular matrix (``"fullrank"``), starting at
    the identity; :math:`\mu` (from 0) and :math:`\sigma` are learnable; and the centre :math:`c`
    and lower-triangular preconditioner :math:`P` are fixed by the initialisation. All learnable
    parameters thus live in preconditioned coordinates: an optimiser step means the same in every
    direction however different the posterior's scales are, and the flow acts on unit-scale noise.
    A volume-preserving flow such as Householder turns a diagonal base into a correlated one.

    Initialisation (``init``):

    - ``"prior"``: :math:`c` at ``init_loc_fn``'s point, :math:`P = I`, :math:`\sigma` = ``init_scale``.
    - ``"laplace"``: :math:`c` at the MAP point in unconstrained space (L-BFGS on Pyro's
      ``AutoLaplaceApproximation``), :math:`P` the Cholesky factor of the Laplace covariance,
      :math:`\sigma = 1`. Flows start near the identity, so the guide starts at the Laplace
      approximation (passed through the non-centring map, re-linearised at the mode, where there
      is one) and the flow learns what is not Gaussian. Falls back to ``"prior"`` with a
      warning where the MAP search diverges or the Hessian is not positive definite.
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
    :param sticking_the_landing: ``True``, ``False`` or ``"auto"``: differentiate :math:`\log q`
        at the guide's own draws only through the draw, leaving out the score term, whose
        expectation is zero (Roeder, Wu & Duvenaud, "Sticking the Landing", NeurIPS 2017). The ELBO's value is unchanged; its
        gradient's variance vanishes as the guide approaches the posterior. Meant for
        ``Trace_ELBO``-type objectives; with Renyi/IWAE objectives it is biased. Each step then
        costs the flow's Jacobian at every draw (D forward-mode passes), so ``"auto"`` (default)
        uses it inside :func:`vi_flows.fit` (see :func:`trace_elbo_objective`) up to
        ``STICKING_THE_LANDING_MAX_DIM`` = 20 latent dimensions, and not in Pyro's ``SVI``.
    :param bool non_centring: where a latent's prior scale follows earlier latents (a centred
        hierarchy's ``theta ~ Normal(mu, tau)``, Neal's funnel), end the guide with a partial
        non-centring of it, linearised from the prior at the start
        (:func:`~vi_flows.noncentring.linearise_prior`): the flow then works in non-centred coordinates,
        while the guide still emits the model's own sites. Each child is non-centred by the prior's
        share of its curvature: fully where no data touch it, hardly where data pin it down. Models
        without such latents are unaffected.
    :param flow_kwargs: passed to :func:`vi_flows.build_flow`.

    Example::

        guide = AutoFlow(model, flow="iaf*2")
        svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    """

    scale_constraint = constraints.softplus_positive
    # median() and quantiles() are Monte Carlo estimates from this many draws.
    summary_num_samples = 4000

    def __init__(
        self,
        model,
        flow=DEFAULT_FLOW,
        base="diagonal",
        init="auto",
        init_loc_fn=init_to_median,
        init_scale=0.1,
        sticking_the_landing="auto",
        non_centring=True,
        **flow_kwargs,
    ):
        if base not in BASES:
            raise ValueError(f"base must be one of {', '.join(map(repr, BASES))}, got {base!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale!r}")
        if sticking_the_landing not in (True, False, "auto"):
            raise ValueError(f"sticking_the_landing must be True, False or 'auto', got {sticking_the_landing!r}")
        parse_spec(flow)
        self.flow_spec = flow
        self.base = base
        self.init = init
        self._init_scale = float(init_scale)
        self.sticking_the_landing = sticking_the_landing
        self.non_centring = bool(non_centring)
        self._flow_kwargs = flow_kwargs
        self._init_loc_fn = _WithUnconstrainedFallback(init_loc_fn)
        self.init_used = None  # "prior" or "laplace", once the guide has been set up
        super().__init__(model, init_loc_fn=self._init_loc_fn)

    def _setup_prototype(self, *args, **kwargs):
        try:
            super()._setup_prototype(*args, **kwargs)
        except Exception:
            # Pyro fails on these later and less clearly; say what is wrong with the model instead.
            if self.prototype_trace is not None:
                check_latent_sites(self.prototype_trace)
            raise
        check_latent_sites(self.prototype_trace)
        centre = self._init_loc()
        self.register_buffer("centre", centre)
        self.register_buffer("preconditioner", eye_like(centre, self.latent_dim))
        self.loc = nn.Parameter(torch.zeros_like(centre))
        self.scale = PyroParam(torch.full_like(centre, self._init_scale), self.scale_constraint)
        if self.base == "diagonal":
            self.base_scale = PyroParam(torch.ones_like(centre), self.scale_constraint)
        elif self.base == "fullrank":
            self.base_scale_tril = PyroParam(eye_like(centre, self.latent_dim), constraints.lower_cholesky)
        self.flow = build_flow(self.flow_spec, self.latent_dim, **self._flow_kwargs).to(centre)
        self._non_centring_depth = 0
        if self.non_centring:
            self._linearise_prior(*args, **kwargs)
        self.init_used = "prior"
        if self.init != "prior":
            # Runs inside whatever SVI step asked for the first sample: hide it from that trace.
            with poutine.block(), torch.enable_grad():
                self._initialise_from_laplace(*args, **kwargs)

    def _linearise_prior(self, *args, **kwargs):
        """Linearise the prior's locations and scales about the centre, for :class:`PartialNonCentring`;
        a model without scale parents gets no such layer."""
        location, location_slopes, scale_slopes, prior_share = linearise_prior(self, *args, **kwargs)
        depth = chain_depth(location_slopes, scale_slopes)
        if depth == 0 and self._non_centring_depth == 0:
            return
        # Each child is non-centred as far as its prior, not its data, sets it; fixed, not learned:
        # the funnel's sd(x) is exp((w^2 - 1) 9/4) of the truth, so a 2% error in w is 10% in sd,
        # and learned weights ended 0.985-1.015.
        linearisation = {
            "origin": self.centre,
            "location": location,
            "location_slopes": location_slopes,
            "scale_slopes": scale_slopes,
            "weight": prior_share,
        }
        for name, value in linearisation.items():
            self.register_buffer(f"non_centring_{name}", value.detach().clone())
        self._non_centring_depth = max(depth, self._non_centring_depth)  # re-linearised at a Laplace mode

    def _initialise_from_laplace(self, *args, **kwargs):
        try:
            laplace = laplace_approximation(self.model, self._init_loc_fn, *args, **kwargs)
        except ValueError as failure:
            if self.init == "laplace":  # "auto" asked for the better of two starts: no news to report
                warnings.warn(f"{failure}; starting from the prior point instead.")
            return
        prior_state = {name: value.detach().clone() for name, value in self.state_dict().items()}
        prior_elbo = None
        if self.init == "auto":
            prior_elbo = self._quick_elbo(*args, **kwargs)
        mode, scale, correlation_tril = laplace
        with torch.no_grad():
            self.centre.copy_(mode)
            self.preconditioner.copy_(scale.unsqueeze(-1) * correlation_tril)
            self.scale = torch.ones_like(scale)
        if self._non_centring_depth:
            self._linearise_prior(*args, **kwargs)
        self.init_used = "laplace"
        if prior_elbo is not None:
            laplace_elbo = self._quick_elbo(*args, **kwargs)
            if not _nan_as_minus_inf(laplace_elbo) > _nan_as_minus_inf(prior_elbo):
                self.load_state_dict(prior_state)
                self.init_used = "prior"

    @torch.no_grad()
    def _quick_elbo(self, *args, **kwargs):
        # Sequential particles: a user's model need not broadcast over a particle dimension.
        return -Trace_ELBO(num_particles=INIT_ELBO_PARTICLES).loss(self.model, self, *args, **kwargs)

    def get_base_dist(self):
        return dist.Normal(torch.zeros_like(self.loc), torch.ones_like(self.loc)).to_event(1)

    def get_posterior(self, *args, **kwargs):
        sticking = self.sticking_the_landing
        if sticking == "auto":
            sticking = _TRACE_ELBO_OBJECTIVE.get() and self.latent_dim <= STICKING_THE_LANDING_MAX_DIM
        path_derivative = self._path_derivative if sticking else None
        return FlowPosterior(self.get_base_dist(), self.get_transform(*args, **kwargs), path_derivative)

    def _path_derivative(self, noise, draw):
        """Zero, with the gradient of log q(draw) that flows through ``draw`` alone.

        With y = f(x) the flow's output and x = B noise its input, the score of q in y is
        J_f^{-T} (d/dx) [log N(B^{-1} x) - log|det J_f(x)|]; it is paired with y recomputed from the
        draw by the outer affine map with its parameters held fixed.
        """
        noise = noise.detach()
        if self.base == "standard":
            flow_input, base_score = noise, -noise
        elif self.base == "diagonal":
            base_scale = self.base_scale.detach()
            flow_input, base_score = base_scale * noise, -noise / base_scale
        else:
            tril = self.base_scale_tril.detach()
            flow_input = (tril @ noise.unsqueeze(-1)).squeeze(-1)
            base_score = -torch.linalg.solve_triangular(tril.mT, noise.unsqueeze(-1), upper=True).squeeze(-1)
        jacobian, log_det_gradient = flow_jacobian(self.flow, flow_input)
        score = torch.linalg.solve_ex(jacobian.mT, base_score - log_det_gradient)[0]
        outer_tril = (self.preconditioner * self.scale).detach()
        outer_shift = (self.centre + self.preconditioner @ self.loc).detach()
        path_derivative = 0.0
        non_centring = self._non_centring_transform()
        if non_centring is not None:  # log q(draw) = log q_u(u) - log|det dx/du|, with u its inverse
            u = non_centring.inv(draw)
            non_centring_log_det = non_centring.log_abs_det_jacobian(u, draw)
            path_derivative = non_centring_log_det.detach() - non_centring_log_det
            draw = u
        flow_output = torch.linalg.solve_triangular(outer_tril, (draw - outer_shift).unsqueeze(-1), upper=False).squeeze(-1)
        return path_derivative + (score * (flow_output - flow_output.detach())).sum(-1)

    def get_transform(self, *args, **kwargs):
        # Every part caches its last (input, output) pair, so scoring a fresh sample walks back
        # through the cache instead of running the flow's (iterative) inverse.
        parts = []
        if self.base == "diagonal":
            parts.append(AffineTransform(0.0, self.base_scale, event_dim=1, cache_size=1))
        elif self.base == "fullrank":
            parts.append(LowerCholeskyAffine(torch.zeros_like(self.loc), self.base_scale_tril, cache_size=1))
        parts.append(self.flow)
        # c + P (mu + sigma * x) as one affine map.
        parts.append(
            LowerCholeskyAffine(self.centre + self.preconditioner @ self.loc, self.preconditioner * self.scale, cache_size=1)
        )
        non_centring = self._non_centring_transform()
        if non_centring is not None:
            parts.append(non_centring)
        return ComposeTransform(parts)

    def _non_centring_transform(self):
        if not self._non_centring_depth:
            return None
        return PartialNonCentring(
            self.non_centring_origin,
            self.non_centring_location,
            self.non_centring_location_slopes,
            self.non_centring_scale_slopes,
            self.non_centring_weight,
            depth=self._non_centring_depth,
        )

    def sample_constrained(self, num_samples, *args, **kwargs):
        """Draw ``num_samples`` from the guide: ``{site: tensor of shape (num_samples, *site_shape)}``."""
        return sample_constrained(self, num_samples, *args, **kwargs)

    @torch.no_grad()
    def quantiles(self, quantiles, *args, **kwargs):
        """Per-element posterior quantiles of each latent site in constrained space.

        A flow posterior has no closed-form quantiles: these are empirical quantiles of
        ``summary_num_samples`` draws. Returns ``{site: tensor of shape (len(quantiles), *site_shape)}``.
        """
        samples = self.sample_constrained(self.summary_num_samples, *args, **kwargs)
        result = {}
        for name, values in samples.items():
            levels = torch.as_tensor(quantiles, dtype=values.dtype, device=values.device)
            result[name] = torch.quantile(values, levels, dim=0)
        return result

    @torch.no_grad()
    def median(self, *args, **kwargs):
        """Per-element posterior median of each latent site (a Monte Carlo estimate, see :meth:`quantiles`)."""
        return {name: values[0] for name, values in self.quantiles([0.5], *args, **kwargs).items()}
