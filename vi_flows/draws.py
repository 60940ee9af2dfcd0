"""Draws from, moments of and densities under any Pyro ``AutoContinuous`` guide, in the model's
constrained space (Pyro's ``Predictive`` runs the model, which fails on ``ImproperUniform`` sites)."""

import torch
from torch.distributions import biject_to

from .pyro_internals import plate_depth, setup, unpack_latent


@torch.no_grad()
def sample_constrained(guide, num_samples, *args, **kwargs):
    """Draw ``num_samples`` from any Pyro ``AutoContinuous`` guide, in the model's constrained space.

    Returns ``{site: tensor of shape (num_samples, *site_shape)}``. Unlike ``Predictive`` this does not
    run the model for the global latents, so it works for models with ``ImproperUniform`` sites; an
    ``AutoFlow``'s local sites are drawn by running the model, a subsample at a time.
    """
    setup(guide, *args, **kwargs)
    latent = guide.get_posterior(*args, **kwargs).sample((num_samples,))
    values = _unpacked(guide, latent)
    local = getattr(guide, "locals", None)
    if local is not None:  # given the globals' draws, over all items
        values.update(local.draw(num_samples, values, lambda name, draws: draws, *args, **kwargs))
    return values


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
    setup(guide, *args, **kwargs)
    parts, log_jacobian, local_log_q = [], 0.0, 0.0
    local = getattr(guide, "locals", None)
    if local is not None:  # q(globals) q(locals | globals): the locals' part at the globals given
        global_draws = {name: draws[name] for name, _ in guide.prototype_trace.iter_stochastic_nodes()}
        local_log_q = local.log_prob(global_draws, draws, *args, **kwargs)
    for name, site in guide.prototype_trace.iter_stochastic_nodes():
        value = draws[name]
        to_unconstrained = biject_to(site["fn"].support).inv
        unconstrained = to_unconstrained(value)
        log_jacobian = log_jacobian + to_unconstrained.log_abs_det_jacobian(value, unconstrained).reshape(len(value), -1).sum(-1)
        parts.append(unconstrained.reshape(len(value), -1))
    packed = torch.cat(parts, -1)
    return guide.get_posterior(*args, **kwargs).log_prob(packed) + log_jacobian + local_log_q


# quantiles() takes this many draws, with a fixed seed so that they are the same on every call.
SUMMARY_DRAWS = 4000


@torch.no_grad()
def quantiles(guide, levels, *args, num_draws=SUMMARY_DRAWS, seed=0, local=True, **kwargs):
    """Posterior quantiles of each latent site of an ``AutoContinuous`` guide: per coordinate of the
    unconstrained latent vector, from ``num_draws`` draws with ``seed`` (the caller's random state is
    left as it was), mapped through each site's bijection, so every one lies in the site's support
    (a Dirichlet site's median sums to one, an ``LKJCholesky`` one has rows of unit norm).

    Returns ``{site: tensor of shape (len(levels), *site_shape)}``; with ``local=False``, an
    ``AutoFlow``'s global sites only (its local ones need a run over every item).
    """
    setup(guide, *args, **kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        latent = guide.get_posterior(*args, **kwargs).sample((num_draws,))
    levels = torch.as_tensor(levels, dtype=latent.dtype, device=latent.device)
    values = _unpacked(guide, torch.quantile(latent, levels, dim=0)) if latent.shape[-1] else {}  # {}: every latent local
    posterior = getattr(guide, "locals", None)
    if posterior is not None and local:
        values.update(_local_quantiles(guide, posterior, latent, levels, seed, *args, **kwargs))
    return values


def _local_quantiles(guide, local, latent, levels, seed, *args, **kwargs):
    """Quantiles of each local coordinate over its draws given the globals' ``latent`` draws, taken in
    unconstrained space and mapped back, as for the globals."""
    global_draws = _unpacked(guide, latent)

    def reduce(name, draws):  # per coordinate in unconstrained space, so each quantile is in the support
        transform = biject_to(local.supports[name])
        return transform(torch.quantile(transform.inv(draws), levels, dim=0))

    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        return local.draw(len(latent), global_draws, reduce, *args, **kwargs)


def _unpacked(guide, latent):
    """``{site: (len(latent), *site_shape)}`` in each site's support, of packed unconstrained rows."""
    # Pyro unpacks rows that sit left of every plate dimension.
    latent = latent.reshape((len(latent),) + (1,) * plate_depth(guide) + latent.shape[-1:])
    return {
        site["name"]: biject_to(site["fn"].support)(value).reshape((len(latent),) + site["value"].shape)
        for site, value in unpack_latent(guide, latent)
    }
