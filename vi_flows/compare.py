"""``compare``: fit several guides to one model and score each against a reference posterior."""

import math
from dataclasses import dataclass, field

import pyro
import torch
from pyro.infer.autoguide import AutoDiagonalNormal, AutoMultivariateNormal, AutoNormal
from pyro.infer.autoguide.initialization import InitMessenger, init_to_feasible

from .arviz_export import to_inference_data
from .compiled_elbo import is_subsampled
from .diagnostics import (
    elbo_estimate,
    iw_elbo,
    khat_reading,
    log_importance_weights,
    moment_errors,
    stable_khat,
    wasserstein_1d,
    worst_moment_errors,
)
from .fitting import fit
from .reference import nuts_reference
from .autoflow import DEFAULT_FLOW, AutoFlow
from .autoflow.initialization import InitWithFallback
from .draws import guide_moments, log_density_at, sample_constrained

DEFAULT_GUIDES = ("meanfield", "fullrank", DEFAULT_FLOW)


def make_guide(name, model, subsampled=False):
    """``"meanfield"`` and ``"fullrank"`` are Pyro's Gaussian autoguides; any other name is a flow spec.
    A ``subsampled`` model's mean-field guide is Pyro's ``AutoNormal``, which keeps a parameter per
    item and reads the subsample's (``AutoDiagonalNormal`` would give every subsample the same
    parameters); a full-rank one over items seen a subsample at a time is refused."""
    if name == "meanfield":
        return AutoNormal(model) if subsampled else AutoDiagonalNormal(model)
    if name == "fullrank":
        if subsampled:
            raise ValueError("a full-rank Gaussian over every item cannot be fitted a subsample at a time; AutoFlow's per-item locals can")
        return AutoMultivariateNormal(model)
    return AutoFlow(model, flow=name)


@dataclass
class CompareResult:
    """``table`` (a pandas DataFrame, one row per guide), ``parameters`` (one row per guide and
    scalar parameter: standardised mean error, sd ratio and 1-D Wasserstein distance in reference
    sds), the fitted ``guides``, their ``fits`` (:class:`~vi_flows.FitResult`), the ``reference``
    draws (with the NUTS run's ``reference_report``, where it made them), ``errors`` of guides that
    failed, and the ``model`` with its ``args`` and ``kwargs``."""

    table: object
    parameters: object = None
    guides: dict = field(default_factory=dict)
    fits: dict = field(default_factory=dict)
    reference: dict = field(default_factory=dict)
    reference_report: dict = field(default_factory=dict)
    reference_skipped: str = ""  # why there is no reference, where compare could not make one
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
            chains = self.reference_report.get("num_chains", 1)  # NUTS chains stay chains, for R-hat
            exported["reference"] = arviz.from_dict(
                posterior={name: values.reshape((chains, -1) + values.shape[1:]).cpu().numpy() for name, values in self.reference.items()},
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


SUBSAMPLED_REFERENCE = (
    "NUTS cannot run a model whose plate reads a subsample; compare a version without subsampling "
    "(the same guide reads it) for a reference, means, sds and k-hat"
)


@dataclass
class Scoring:
    """How :func:`compare` scores a fitted guide: ``num_draws`` of its draws, against ``reference``
    draws (or exact ``reference_moments``, with the guide's moments from ``moment_draws`` draws) and a
    known ``log_z``, where given."""

    reference: dict
    log_z: float = None
    num_draws: int = 4096
    reference_moments: dict = None
    moment_draws: int = None
    subsampled: bool = False  # the model reads a subsample: its log weights carry the subsample's noise


def _score(model, guide, fitted, scoring, args, kwargs):
    """The table's row for one fitted guide, and its rows of per-parameter errors."""
    log_weights = log_importance_weights(model, guide, *args, num_samples=scoring.num_draws, **kwargs)
    elbo, elbo_se = elbo_estimate(log_weights)
    drawn = [log_weights]  # k-hat's first set is the one the ELBO came from

    def draw_log_weights(num):
        return drawn.pop() if drawn else log_importance_weights(model, guide, *args, num_samples=num, **kwargs)

    # A subsampled model's log weights are unbiased for the full data's only in their mean: the
    # IW-ELBO and k-hat would read the subsample's noise as the guide's misfit.
    khat, khat_draws = stable_khat(draw_log_weights, scoring.num_draws) if not scoring.subsampled else (math.nan, 0)
    row = {
        "elbo": elbo,
        "elbo_se": elbo_se,
        "iw_elbo": iw_elbo(log_weights) if not scoring.subsampled else math.nan,
        "khat": khat,
        "khat_draws": khat_draws,
        "khat_reading": khat_reading(khat) if not scoring.subsampled else "not read: subsampled",
        "kl": scoring.log_z - elbo if scoring.log_z is not None else math.nan,
        **dict.fromkeys(["worst_mean_error", "sd_ratio_min", "sd_ratio_max", "mean_log_q_at_reference"], math.nan),
        "steps": fitted.num_steps,
        "rollbacks": len(fitted.rollbacks),
        "fit_seconds": fitted.seconds,
        "ms_per_step": 1e3 * (fitted.seconds - fitted.compile_seconds) / max(fitted.num_steps, 1),
    }
    if not scoring.reference:
        return row, []
    row["mean_log_q_at_reference"] = log_density_at(guide, scoring.reference, *args, **kwargs).mean().item()
    draws = sample_constrained(guide, scoring.num_draws, *args, **kwargs)
    moments = scoring.reference_moments or {name: (values.mean(0), values.std(0)) for name, values in scoring.reference.items()}
    moments = {name: value for name, value in moments.items() if name in draws}
    guide_side = guide_moments(guide, scoring.moment_draws, *args, **kwargs) if scoring.moment_draws else draws
    errors = moment_errors(guide_side, moments)
    row["worst_mean_error"] = worst_moment_errors(errors)[0]
    ratios = torch.cat([ratio.reshape(-1) for _, ratio in errors.values()])
    row["sd_ratio_min"], row["sd_ratio_max"] = ratios.min().item(), ratios.max().item()
    parameters = []
    for name, (mean_error, sd_ratio) in errors.items():
        distance = wasserstein_1d(draws[name], scoring.reference[name]) / moments[name][1]
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
) -> CompareResult:
    """Fit each guide with :func:`vi_flows.fit` on the same budget and seed, and score it.

    :param guides: names: ``"meanfield"``, ``"fullrank"`` or any flow spec; or a dict from labels to
        such names or to functions ``model -> guide`` (e.g. ``lambda m: AutoFlow(m, non_centring=False)``).
    :param reference: ``"nuts"`` (:func:`~vi_flows.reference.nuts_reference`: Pyro's NUTS, cached),
        ``None``, or the user's own draws ``{site: (N, *site_shape)}``.
    :param log_z: the model's log normaliser, if known: adds KL = log Z - ELBO.
    :param num_steps: passed to :func:`vi_flows.fit` (``None``: its stopping rule).
    :param quiet: no progress bars.
    :param reference_moments: the posterior's exact ``{site: (mean, sd)}``, if known, to score means
        and sds against instead of the reference draws' own.
    :param moment_draws: how many of each guide's draws its means and sds come from (default
        ``num_draws``; pooled by :func:`vi_flows.guide_moments`). Heavy tails need many, and exact
        moments: the funnel's x has kurtosis 24000, and in 4096 exact draws the worst of its nine
        sds is typically 31% off (median of 200 sets of draws).
    :returns: :class:`CompareResult`; its ``table`` has the ELBO and its standard error, the
        IW-ELBO and PSIS k-hat over ``num_draws`` draws, the worst standardised mean error, the
        range of sd ratios and the mean log q at the reference draws (mass-covering: a guide that
        misses part of the posterior scores badly) in the constrained space, the fit's steps,
        rollbacks (:func:`vi_flows.fit`) and time. A guide that fails gets a row of NaNs and its
        error in ``errors``; the others go on. Nothing is printed. On a model that reads a
        subsample of a plate, NUTS cannot run (``reference_skipped`` says so) and the IW-ELBO and
        k-hat are NaN: the ELBO's estimate is unbiased for the full data's, they would read the
        subsample's noise as misfit.
    """
    import pandas

    result = CompareResult(table=None, model=model, args=args, kwargs=kwargs)
    # A run that samples nothing: ImproperUniform sites cannot be sampled.
    subsampled = is_subsampled(InitMessenger(InitWithFallback(init_to_feasible))(model), *args, **kwargs)
    if isinstance(reference, str):
        if reference != "nuts":
            raise ValueError(f"reference must be 'nuts', None or a dict of draws, got {reference!r}")
        if subsampled:
            reference, result.reference_skipped = None, SUBSAMPLED_REFERENCE
        else:
            reference, result.reference_report = nuts_reference(model, *args, seed=seed, quiet=quiet, **kwargs)
    result.reference = reference or {}
    if subsampled and result.reference:
        raise ValueError(f"reference draws score every item, and the model reads a subsample: {SUBSAMPLED_REFERENCE}")
    scoring = Scoring(result.reference, log_z, num_draws, reference_moments, moment_draws, subsampled)
    rows, per_parameter = [], []
    for name, spec in guides.items() if isinstance(guides, dict) else [(name, name) for name in guides]:
        pyro.clear_param_store()
        try:
            guide = spec(model) if callable(spec) else make_guide(spec, model, subsampled)
            fitted = fit(model, guide, *args, num_steps=num_steps, seed=seed, progress=not quiet, **kwargs)
            row, parameters = _score(model, guide, fitted, scoring, args, kwargs)
            result.guides[name], result.fits[name] = guide, fitted
            per_parameter.extend({"guide": name, **entry} for entry in parameters)
        except Exception as failure:  # one guide failing must not lose the others' results
            result.errors[name], row = failure, {}
        rows.append({"guide": name, **row})
    result.table = pandas.DataFrame(rows).set_index("guide")
    result.parameters = pandas.DataFrame(per_parameter, columns=["guide", "parameter", "mean_error", "sd_ratio", "wasserstein"])
    return result
