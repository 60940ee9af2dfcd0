"""Where ``AutoFlow`` starts: the prior point, a Laplace approximation, or the better of the two."""

import math
import warnings

import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch.distributions import biject_to

from .local_initialization import collapsed_log_joint, collapsed_terms, constrained_values

INITS = ("auto", "laplace", "prior")
# Draws behind init="auto"'s choice between the prior point and the Laplace fit.
INIT_ELBO_PARTICLES = 32


class InitWithFallback:
    """``init_loc_fn``, except that sites it cannot sample (``ImproperUniform``) start at the
    unconstrained origin instead of failing, as Pyro's ``init_to_feasible`` does. A class rather
    than a closure, so that a guide can be pickled whole (``torch.save(guide, path)``)."""

    def __init__(self, init_loc_fn):
        self.init_loc_fn = init_loc_fn

    def __call__(self, site):
        try:
            return self.init_loc_fn(site)
        except NotImplementedError:
            fn = site["fn"]
            to_support = biject_to(fn.support)
            return to_support(torch.zeros(to_support.inverse_shape(fn.shape())))


def log_joint(guide, latent, *args, **kwargs):
    """The model's log joint density at a packed unconstrained latent vector, with the log-Jacobian
    of the maps to each site's support: the density of the latent vector itself. With local
    posteriors, the latent vector holds the globals, and the locals are integrated out
    (:func:`~vi_flows.autoflow.local_initialization.collapsed_log_joint`)."""
    if getattr(guide, "locals", None) is not None:
        return collapsed_log_joint(guide, latent, *args, **kwargs)
    values, log_jacobian = constrained_values(guide, latent)
    with poutine.block():
        trace = poutine.trace(poutine.condition(guide.model, data=values)).get_trace(*args, **kwargs)
    return trace.log_prob_sum() + log_jacobian


def laplace_approximation(guide, *args, max_iter=1000, **kwargs):
    """The mode of the model's density over the guide's latent vector, from the guide's centre
    (L-BFGS), and the Cholesky factor of the inverse Hessian there. No Pyro parameter is created,
    so the caller's param store and whatever SVI step is running stay untouched.

    Raises ``ValueError`` saying why where the search diverges or the Hessian is not positive definite.
    """

    def potential(latent):
        return -log_joint(guide, latent, *args, **kwargs)

    mode = guide.centre.detach().clone().requires_grad_()
    optimizer = torch.optim.LBFGS([mode], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        loss = potential(mode)
        # The mode's gradient only: backward() would also leave one on every parameter the
        # potential reads (the local tables), for the fit's first step to add to its own.
        (mode.grad,) = torch.autograd.grad(loss, mode)
        return loss

    try:
        with torch.enable_grad():
            optimizer.step(closure)
            if not torch.isfinite(mode).all():
                raise ValueError("the MAP search diverged")
            mode, hessian = _curvature(guide, potential, mode.detach(), *args, **kwargs)
        covariance_tril = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)))
    # cholesky raises RuntimeError subclasses; torch's strong-Wolfe line search can raise
    # IndexError when the loss turns NaN inside a bracket.
    except (ValueError, RuntimeError, IndexError) as failure:
        reason = str(failure).splitlines()[0] if str(failure) else type(failure).__name__
        raise ValueError(f"Laplace initialisation failed ({reason})") from failure
    return mode.detach(), covariance_tril


def _curvature(guide, potential, mode, *args, **kwargs):
    """``(mode, Hessian)`` of the potential there. With local posteriors the search read some of the
    items (:data:`~vi_flows.autoflow.local_initialization.COLLAPSED_SUBSAMPLES` subsamples); one Newton
    step on all of them corrects it."""
    if getattr(guide, "locals", None) is None:
        return mode, torch.autograd.functional.hessian(potential, mode)

    # Term by term, so that memory follows a subsample, not the items.
    hessian, gradient = 0.0, 0.0
    for term in collapsed_terms(guide, *args, max_subsamples=None, **kwargs):
        hessian = hessian - torch.autograd.functional.hessian(term, mode)
        latent = mode.clone().requires_grad_()
        gradient = gradient - torch.autograd.grad(term(latent), latent)[0]
    return mode - torch.linalg.solve(hessian, gradient), hessian


def start(guide, init, *args, **kwargs):
    """Move a set-up guide, which starts at the prior point, to where ``init`` says (see ``AutoFlow``);
    return ``"prior"`` or ``"laplace"``, the start kept."""
    if init == "prior":
        return "prior"
    try:
        mode, covariance_tril = laplace_approximation(guide, *args, **kwargs)
    except ValueError as failure:
        if init == "laplace":  # "auto" asked for the better of two starts: no news to report
            warnings.warn(f"{failure}; starting from the prior point instead.")
        return "prior"
    prior_state = {name: value.detach().clone() for name, value in guide.state_dict().items()}
    # With local posteriors the quick ELBO is a subsample's, too noisy to choose by: the Laplace
    # start, with the locals integrated out, is kept.
    compare = init == "auto" and getattr(guide, "locals", None) is None
    prior_elbo = _quick_elbo(guide, *args, **kwargs) if compare else None
    guide.recentre(mode, covariance_tril, *args, **kwargs)
    if prior_elbo is not None and not _quick_elbo(guide, *args, **kwargs) > prior_elbo:
        guide.load_state_dict(prior_state)
        return "prior"
    return "laplace"


@torch.no_grad()
def _quick_elbo(guide, *args, **kwargs):
    # Sequential particles: a user's model need not broadcast over a particle dimension.
    elbo = -Trace_ELBO(num_particles=INIT_ELBO_PARTICLES).loss(guide.model, guide, *args, **kwargs)
    return -math.inf if math.isnan(elbo) else elbo
