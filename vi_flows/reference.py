"""Reference posteriors to score guides against: a long NUTS run, cached on disk under a key that
covers everything the draws depend on."""

import hashlib
import inspect
import math
import os
import time
import warnings
from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS
from pyro.infer.mcmc.util import initialize_model
from pyro.infer.autoguide.initialization import InitMessenger, init_to_uniform

from .threads import fastest_threads, intra_op_threads


def default_cache_dir():
    return Path(os.environ.get("VI_FLOWS_CACHE", Path.home() / ".cache" / "vi-flows"))


def cache_key(model, args, kwargs, settings):
    """A hash of everything a reference for ``model(*args, **kwargs)`` depends on: the model's source,
    its arguments, the data it reads (the values of its observed sites and its log density at a
    fixed point, which every covariate it reads from a module global enters), the parameters it
    reads, the sampler's ``settings`` and the versions of Pyro and torch."""
    digest = hashlib.sha256()
    try:
        digest.update(inspect.getsource(model).encode())
    except (OSError, TypeError):  # no source (a lambda in a REPL, a C function): fall back to the name
        digest.update(repr(model).encode())
    values = [*args, *sorted(kwargs.items()), settings, pyro.__version__, torch.__version__]
    with torch.random.fork_rng(), poutine.block():
        torch.manual_seed(0)
        trace = poutine.trace(InitMessenger(init_to_uniform)(model)).get_trace(*args, **kwargs)
        values.append(trace.log_prob_sum())
    values += [site["value"] for site in trace.nodes.values() if site["type"] == "param" or site.get("is_observed")]
    for value in values:
        for item in value if isinstance(value, tuple) else (value,):
            digest.update(item.detach().cpu().numpy().tobytes() if torch.is_tensor(item) else repr(item).encode())
    return digest.hexdigest()[:20]


def nuts_reference(
    model, *args, num_chains=2, num_samples=1000, warmup_steps=1000, seed=0, cache_dir=None, quiet=False, threads="auto", **kwargs
):
    """Posterior draws ``{site: (num_chains * num_samples, *site_shape)}`` from Pyro's NUTS, chain
    after chain, with a report.

    Chains run one after another (seeds ``seed``, ``seed + 1``, ...; ``quiet``: no progress bars).
    Draws are cached on disk under ``cache_dir`` (default ``$VI_FLOWS_CACHE`` or
    ``~/.cache/vi-flows``), keyed by :func:`cache_key`. Returns ``(draws, report)``; ``report`` has
    ``num_chains``, the worst R-hat and the smallest bulk ESS over all parameters (ArviZ),
    ``converged`` (R-hat < 1.05, ESS > 100), ``seconds`` and ``cached``; a reference that did not
    converge is returned all the same, with a warning. ``threads`` is the intra-op threads the chains
    run on: ``"auto"`` keeps one unless all are 1.2x faster at the model's log density and gradient
    (:func:`~vi_flows.threads.fastest_threads`), as ``fit`` chooses; the caller's setting is restored.
    """
    settings = (num_chains, num_samples, warmup_steps, seed)
    path = Path(cache_dir or default_cache_dir()) / f"nuts-{cache_key(model, args, kwargs, settings)}.pt"
    if path.exists():
        draws, report = torch.load(path)
        return draws, {**report, "cached": True}
    chains = []
    start = time.perf_counter()
    num_threads = _threads(threads, model, args, kwargs)
    with intra_op_threads(num_threads):
        for chain in range(num_chains):
            pyro.set_rng_seed(seed + chain)
            mcmc = MCMC(NUTS(model), num_samples=num_samples, warmup_steps=warmup_steps, disable_progbar=quiet)
            mcmc.run(*args, **kwargs)
            chains.append(mcmc.get_samples())
    by_chain = {name: torch.stack([chain[name] for chain in chains]) for name in chains[0]}
    report = {"seconds": time.perf_counter() - start, "num_chains": num_chains, "num_threads": num_threads}
    report.update(_convergence(by_chain), cached=False)
    if not report["converged"]:
        warnings.warn(
            f"the NUTS reference may not have converged (worst R-hat {report['worst_rhat']:.3f}, smallest bulk ESS "
            f"{report['smallest_ess']:.0f}); moment errors against it are unreliable. Run longer chains or reparametrise the model."
        )
    draws = {name: value.reshape((-1,) + value.shape[2:]) for name, value in by_chain.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save((draws, report), path)
    return draws, report


def _threads(threads, model, args, kwargs):
    """``threads``, or with "auto" the faster of one and all at what NUTS repeats: the potential energy
    and its gradient, at a draw from the prior."""
    if threads != "auto":
        return int(threads)
    with torch.random.fork_rng():  # a seeded reference draws what it would have
        params, potential_fn, _, _ = initialize_model(model, model_args=args, model_kwargs=kwargs)
        params = {name: value.detach().requires_grad_() for name, value in params.items()}

        def potential_and_gradient():
            torch.autograd.grad(potential_fn(params), list(params.values()))

        with pyro.validation_enabled(False):
            return fastest_threads(potential_and_gradient)


def _convergence(by_chain):
    import arviz

    posterior = arviz.from_dict(posterior={name: value.cpu().numpy() for name, value in by_chain.items()})
    num_chains = next(iter(by_chain.values())).shape[0]
    worst_rhat = float(arviz.rhat(posterior).to_array().max()) if num_chains > 1 else math.nan
    smallest_ess = float(arviz.ess(posterior).to_array().min())
    return {"worst_rhat": worst_rhat, "smallest_ess": smallest_ess, "converged": bool(smallest_ess > 100 and not worst_rhat >= 1.05)}
