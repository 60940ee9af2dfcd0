"""``compare``: fit several guides to one model and score each against a reference posterior."""

import hashlib
import inspect
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import AutoDiagonalNormal, AutoMultivariateNormal

from .arviz_export import to_inference_data
from .diagnostics import (
    elbo_estimate,
    iw_elbo,
    khat_reading,
    log_importance_weights,
    moment_errors,
    psis_khat,
    wasserstein_1d,
    worst_moment_errors,
)
from .fitting import fit
from .autoflow import DEFAULT_FLOW, AutoFlow
from .draws import guide_moments, log_density_at, sample_constrained

DEFAULT_GUIDES = ("meanfield", "fullrank", DEFAULT_FLOW)


def make_guide(name, model):
    """``"meanfield"`` and ``"fullrank"`` are Pyro's Gaussian autoguides; any other name is a flow spec."""
    if name == "meanfield":
        return AutoDiagonalNormal(model)
    if name == "fullrank":
        return AutoMultivariateNormal(model)
    return AutoFlow(model, flow=name)


def _cache_key(model, args, kwargs, settings):
    """Hash of the model's source, its data and the sampler settings: a changed model or data set
    never reuses a stale reference."""
    digest = hashlib.sha256()
    try:
        digest.update(inspect.getsource(model).encode())
    except (OSError, TypeError):  # no source (a lambda in a REPL, a C function): fall back to the name
        digest.update(repr(model).encode())
    for value in [*args, *sorted(kwargs.items()), settings]:
        values = value if isinstance(value, tuple) else (value,)
        for item in values:
            digest.update(item.detach().cpu().numpy().tobytes() if torch.is_tensor(item) else repr(item).encode())
    return digest.hexdigest()[:20]


def default_cache_dir():
    return Path(os.environ.get("VI_FLOWS_CACHE", Path.home() / ".cache" / "vi-flows"))


def nuts_reference(
    model, *args, num_chains=2, num_samples=1000, warmup_steps=1000, seed=0, cache_dir=None, quiet=False, **kwargs
):
    """Posterior draws ``{site: (num_chains * num_samples, *site_shape)}`` from Pyro's NUTS, with a report.

    Chains run one after another (seeds ``seed``, ``seed + 1``, ...). Draws are cached on disk under
    ``cache_dir`` (default ``$VI_FLOWS_CACHE`` or ``~/.cache/vi-flows``) keyed by the model's source,
    its arguments and these settings. Returns ``(draws, report)``; ``report`` has the worst R-hat and
    the smallest bulk ESS over all parameters (ArviZ) and ``converged`` (R-hat < 1.05, ESS > 100);
    a reference that did not converge is returned all the same, with a warning.
    """
    import arviz

    settings = (num_chains, num_samples, warmup_steps, seed)
    path = Path(cache_dir or default_cache_dir()) / f"nuts-{_cache_key(model, args, kwargs, settings)}.pt"
    if path.exists():
        draws, report = torch.load(path)
        return draws, {**report, "cached": True}
    chains = []
    start = time.perf_counter()
    for chain in range(num_chains):
        pyro.set_rng_seed(seed + chain)
        mcmc = MCMC(NUTS(model), num_samples=num_samples, warmup_steps=warmup_steps, disable_progbar=quiet)
        mcmc.run(*args, **kwargs)
        chains.append(mcmc.get_samples())
    by_chain = {name: torch.stack([chain[name] for chain in chains]) for name in chains[0]}
    posterior = arviz.from_dict(posterior={name: value.cpu().numpy() for name, value in by_chain.items()})
    worst_rhat = float(arviz.rhat(posterior).to_array().max()) if num_chains > 1 else math.nan
    smallest_ess = float(arviz.ess(posterior).to_array().min())
    report = {
        "seconds": time.perf_counter() - start,
        "worst_rhat": worst_rhat,
        "smallest_ess": smallest_ess,
        "converged": bool(smallest_ess > 100 and not worst_rhat >= 1.05),
        "cached": False,
    }
    if not report["converged"]:
        warnings.warn(
            f"the NUTS reference may not have converged (worst R-hat {worst_rhat:.3f}, smallest bulk ESS "
            f"{smallest_ess:.0f}); moment errors against it are unreliable. Run longer chains or reparametrise the model."
        )
    draws = {name: value.reshape((-1,) + value.shape[2:]) for name, value in by_chain.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save((draws, report), path)
    return draws, report


@dataclass
class CompareResult:
    """``table`` (a pandas DataFrame, one row per guide), ``parameters`` (one row per guide and
    scalar parameter: standardised mean error, sd ratio and 1-D Wasserstein distance in reference
    sds), the fitted ``guides``, their ``fits`` (:class:`~vi_flows.FitResult`), the ``reference``
    draws, ``errors`` of guides that failed, and the ``model`` with its ``args`` and ``kwargs``."""

    table: object
    parameters: object = None
    guides: dict = field(default_factory=dict)
    fits: dict = field(default_factory=dict)
    reference: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    model: object = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def inference_data(self, num_samples=1000):
        """Every fitted guide (:func:`~vi_flows.to_inference_data`, ``num_samples`` draws) and the
        reference draws (under ``"reference"``) as ``arviz.InferenceData``, keyed by name, with the
        same dims, so ArviZ shows them side by side::

            exported = result.inference_data()
            az.plot_forest(list(exported.values()), model_names=list(exported), var_names=["tau"])
        """
        import arviz

        exported = {
            name: to_inference_data(guide, self.model, *self.args, num_samples=num_samples, **self.kwargs)
            for name, guide in self.guides.items()
        }
        if self.reference:
            # Plate dims come from a guide's export (reference draws carry none).
            dims, coords = {}, {}
            if exported:
                posterior = next(iter(exported.values())).posterior
                dims = {name: list(posterior[name].dims[2:]) for name in self.reference if name in posterior}
                coords = {dim: posterior[dim].values for dim in posterior.dims if dim not in ("chain", "draw")}
            exported["reference"] = arviz.from_dict(
                posterior={name: values.unsqueeze(0).cpu().numpy() for name, values in self.reference.items()},
                dims=dims,
                coords=coords,
            )
        return exported

    def summary(self, num_samples=1000):
        """``arviz.summary`` (mean, sd, HDI) of every guide and the reference in one DataFrame
        indexed by (guide, parameter)."""
        import arviz
        import pandas

        return pandas.concat(
            {name: arviz.summary(data, kind="stats") for name, data in self.inference_data(num_samples).items()},
            names=["guide", "parameter"],
        )


def _score(model, guide, result, reference, log_z, num_draws, args, kwargs, reference_moments=None, moment_draws=None):
    log_weights = log_importance_weights(model, guide, *args, num_samples=num_draws, **kwargs)
    elbo, elbo_se = elbo_estimate(log_weights)
    khat = psis_khat(log_weights)
    row = {
        "elbo": elbo,
        "elbo_se": elbo_se,
        "iw_elbo": iw_elbo(log_weights),
        "khat": khat,
        "khat_reading": khat_reading(khat),
        "kl": log_z - elbo if log_z is not None else math.nan,
        "worst_mean_error": math.nan,
        "sd_ratio_min": math.nan,
        "sd_ratio_max": math.nan,
        "steps": result.num_steps,
        "fit_seconds": result.seconds,
        "ms_per_step": 1e3 * (result.seconds - result.compile_seconds) / max(result.num_steps, 1),
    }
    parameters = []
    row["mean_log_q_at_reference"] = math.nan
    if reference:
        row["mean_log_q_at_reference"] = log_density_at(guide, reference, *args, **kwargs).mean().item()
        draws = sample_constrained(guide, num_draws, *args, **kwargs)
        moments = reference_moments or {name: (values.mean(0), values.std(0)) for name, values in reference.items()}
        moments = {name: value for name, value in moments.items() if name in draws}
        guide_side = guide_moments(guide, moment_draws, *args, **kwargs) if moment_draws else draws
        errors = moment_errors(guide_side, moments)
        row["worst_mean_error"] = worst_moment_errors(errors)[0]
        ratios = torch.cat([ratio.reshape(-1) for _, ratio in errors.values()])
        row["sd_ratio_min"], row["sd_ratio_max"] = ratios.min().item(), ratios.max().item()
        for name, (mean_error, sd_ratio) in errors.items():
            distance = wasserstein_1d(draws[name], reference[name]) / moments[name][1]
            for index in range(mean_error.numel()):
                parameters.append(
                    {
                        "parameter": name if mean_error.dim() == 0 else f"{name}[{index}]",
                        "mean_error": mean_error.reshape(-1)[index].item(),
                        "sd_ratio": sd_ratio.reshape(-1)[index].item(),
                        "wasserstein": distance.reshape(-1)[index].item(),
                    }
                )
    return row, parameters


def compare(
    model,
    *args,
    guides=DEFAULT_GUIDES,
    reference="nuts",
    log_z=None,
    num_steps=None,
    seed=0,
    num_draws=4096,
    quiet=False,
    reference_moments=None,
    moment_draws=None,
    **kwargs,
):
    """Fit each guide with :func:`vi_flows.fit` on the same budget and seed, and score it.

    :param guides: names: ``"meanfield"``, ``"fullrank"`` or any flow spec; or a dict from labels to
        such names or to functions ``model -> guide`` (e.g. ``lambda m: AutoFlow(m, non_centring=False)``).
    :param reference: ``"nuts"`` (:func:`nuts_reference`: Pyro's NUTS, cached), ``None``, or the
        user's own draws ``{site: (N, *site_shape)}``.
    :param log_z: the model's log normaliser, if known: adds KL = log Z - ELBO.
    :param num_steps: passed to :func:`vi_flows.fit` (``None``: its stopping rule).
    :param reference_moments: the posterior's exact ``{site: (mean, sd)}``, if known, to score means
        and sds against instead of the reference draws' own.
    :param moment_draws: how many of each guide's draws its means and sds come from (default
        ``num_draws``; pooled by :func:`vi_flows.guide_moments`). Heavy tails need many, and exact
        moments: the funnel's x has kurtosis 24000, and in 4096 exact draws the worst of its nine
        sds is typically 31% off (median of 200 sets of draws).
    :returns: :class:`CompareResult`; its ``table`` has the ELBO and its standard error, the
        IW-ELBO and PSIS k-hat over ``num_draws`` draws, the worst standardised mean error, the
        range of sd ratios and the mean log q at the reference draws (mass-covering: a guide that
        misses part of the posterior scores badly) in the constrained space, and fit time. A guide that
        fails gets a row of NaNs and its error in ``errors``; the others go on.
    """
    import pandas

    if isinstance(reference, str):
        if reference != "nuts":
            raise ValueError(f"reference must be 'nuts', None or a dict of draws, got {reference!r}")
        reference, report = nuts_reference(model, *args, seed=seed, quiet=quiet, **kwargs)
        if not quiet:
            source = "from the cache" if report["cached"] else f"in {report['seconds']:.1f} s"
            print(
                f"NUTS reference {source}: worst R-hat {report['worst_rhat']:.3f}, smallest bulk ESS {report['smallest_ess']:.0f}"
            )
    result = CompareResult(table=None, reference=reference or {}, model=model, args=args, kwargs=kwargs)
    rows, per_parameter = [], []
    entries = guides.items() if isinstance(guides, dict) else [(name, name) for name in guides]
    for name, spec in entries:
        pyro.clear_param_store()
        guide = spec(model) if callable(spec) else make_guide(spec, model)
        try:
            fitted = fit(model, guide, *args, num_steps=num_steps, seed=seed, progress=not quiet, **kwargs)
            row, parameters = _score(
                model, guide, fitted, result.reference, log_z, num_draws, args, kwargs, reference_moments, moment_draws
            )
            result.guides[name], result.fits[name] = guide, fitted
            per_parameter.extend({"guide": name, **entry} for entry in parameters)
        except Exception as failure:  # one guide failing must not lose the others' results
            result.errors[name] = failure
            row = {}
            if not quiet:
                print(f"{name}: failed: {type(failure).__name__}: {failure}".split("\n")[0])
        rows.append({"guide": name, **row})
    result.table = pandas.DataFrame(rows).set_index("guide")
    result.parameters = pandas.DataFrame(per_parameter, columns=["guide", "parameter", "mean_error", "sd_ratio", "wasserstein"])
    return result
