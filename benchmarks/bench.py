"""Benchmarks against Pyro's own guides and NUTS: ``python benchmarks/bench.py [speed|kl|fit|choose|stl|all]``.

``speed`` prints the milliseconds per step (16 vectorised particles) of every family at K = 8 layers
(IAF at 2), as ``fit`` runs it (compiled) and in Pyro's ``SVI``, next to Pyro's equivalent guide,
measured interleaved in one run, and the ratio of ``fit``'s step to Pyro's SVI step.
``kl`` fits every family and Pyro's equivalent on the known-log-Z targets of ``vi_flows.models``
and prints KL(q || p) = log Z - ELBO (ELBO from 4096 draws, with its standard error).
``fit`` compares the default ``fit(model, AutoFlow(model))`` with a fixed-budget loop on Pyro's
full-rank guide and with Pyro's NUTS, by their moment errors against the exact posterior, and on
the zoo's other models against a long NUTS run.
``choose`` fits candidate default flows with the default ``fit`` and prints their KL and moment
errors (``--flows`` and ``--seeds`` pick which).
``stl`` compares the default fit with and without ``sticking_the_landing`` over several seeds and
prints what the path-derivative gradient costs per step.
"""

import argparse
import functools
import importlib
import math
import statistics
import time

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import (
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormalizingFlow,
)

from vi_flows.autoflow import DEFAULT_FLOW, AutoFlow
from vi_flows.compiled_elbo import CompileError
from vi_flows.diagnostics import (
    elbo_estimate,
    log_importance_weights,
    moment_errors,
    worst_moment_errors,
)
from vi_flows.draws import guide_moments
from vi_flows.elbo_step import ELBOStep
from vi_flows.fitting import fit
from vi_flows.models import KNOWN_LOG_Z, reference_moments
from vi_flows.pyro_internals import max_plate_nesting

SPECS = {
    "planar": "planar*8",
    "radial": "radial*8",
    "householder": "householder*8",
    "sylvester-orthogonal": "sylvester-orthogonal*8",
    "sylvester-householder": "sylvester-householder*8",
    "sylvester-triangular": "sylvester-triangular*8",
    "iaf": "iaf*2",
}
# Draws behind the flows' moment errors. The funnel's x has kurtosis 3 exp(9): the worst sd of 10^7
# exact draws was 1.7-3.4% off the truth (3 seeds), of 10^6 5-15.5% (6 seeds).
MOMENT_DRAWS = 10_000_000


def _compose(make_layer, num_layers, dim):
    return T.ComposeTransformModule([make_layer(dim) for _ in range(num_layers)])


def pyro_guide(family, model):
    """Pyro's built-in guide closest to ``SPECS[family]``."""
    if family == "iaf":
        return AutoIAFNormal(model, num_transforms=2)
    layers = {
        "planar": functools.partial(_compose, T.Planar, 8),
        "radial": functools.partial(_compose, T.Radial, 8),
        "householder": lambda dim: T.Householder(dim, count_transforms=8),
        # Pyro has one Sylvester flow: Q from Householder reflections.
        "sylvester-orthogonal": functools.partial(_compose, T.Sylvester, 8),
        "sylvester-householder": functools.partial(_compose, T.Sylvester, 8),
        "sylvester-triangular": functools.partial(_compose, T.Sylvester, 8),
    }[family]
    return AutoNormalizingFlow(model, layers)


def _gaussian_model(dim):
    def model():
        pyro.sample("x", dist.Normal(torch.zeros(dim), 1.0).to_event(1))

    return model


def _svi(model, guide, lr=1e-2, num_particles=16):
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=max_plate_nesting(model, guide))
    return SVI(model, guide, pyro.optim.Adam({"lr": lr}), elbo)


def _compiled_step(model, guide, num_particles=16, sticking_the_landing=False):
    """``fit``'s compiled step of ``guide``, or the reason it cannot be compiled."""
    # Its own parameter store: an SVI run of a guide of the same class must not share parameters.
    with pyro.get_param_store().scope():
        try:
            nesting = max_plate_nesting(model, guide)
            return ELBOStep(
                model, guide, num_particles=num_particles, max_plate_nesting=nesting, compile=True, sticking_the_landing=sticking_the_landing
            )
        except CompileError as failure:
            return failure


def speed(dims=(10, 100), rounds=5, steps=40):
    """Milliseconds per step: our flows as ``fit`` runs them (compiled) and in Pyro's SVI, next to
    Pyro's equivalent guide in Pyro's SVI and, to show where the gain comes from, in ``fit``'s step."""
    print(f"ms per step, 16 vectorised particles, median of {rounds} interleaved rounds of {steps} steps")
    columns = ("vi-flows fit", "vi-flows SVI", "pyro SVI", "pyro in fit")
    print(f"{'D':>4} {'family':<22} {'spec':<24} " + " ".join(f"{c:>12}" for c in columns) + f" {'fit/pyro':>9} {'compile s':>9}")
    for dim in dims:
        model = _gaussian_model(dim)
        runs, compile_seconds = {}, {}
        for family, spec in SPECS.items():
            pyro.clear_param_store()
            # The plain ELBO gradient in both, as Pyro's guides have no path-derivative option.
            ours = _compiled_step(model, AutoFlow(model, flow=spec, base="standard"))
            compile_seconds[family] = math.nan if isinstance(ours, CompileError) else ours.compile_seconds
            ours_svi = _svi(model, AutoFlow(model, flow=spec, base="standard"))
            theirs_svi = _svi(model, pyro_guide(family, model))
            theirs = _compiled_step(model, pyro_guide(family, model))
            compiled = [step if isinstance(step, CompileError) else functools.partial(step, 1e-2) for step in (ours, theirs)]
            runs[family] = [compiled[0], ours_svi.step, theirs_svi.step, compiled[1]]
            for step in runs[family]:
                if callable(step):
                    step()  # set-up, parameter creation
        times = {family: [[] for _ in columns] for family in runs}
        for _ in range(rounds):
            for family, steppers in runs.items():
                for step, record in zip(steppers, times[family]):
                    if callable(step):
                        start = time.perf_counter()
                        for _ in range(steps):
                            step()
                        record.append((time.perf_counter() - start) / steps * 1e3)
        for family, records in times.items():
            medians = [statistics.median(record) if record else math.nan for record in records]
            cells = " ".join(f"{m:>12.2f}" if record else f"{'fails':>12}" for m, record in zip(medians, records))
            print(
                f"{dim:>4} {family:<22} {SPECS[family]:<24} {cells} {medians[0] / medians[2]:>9.2f} {compile_seconds[family]:>9.1f}",
                flush=True,
            )


def _kl(module, guide, steps, seed):
    pyro.set_rng_seed(seed)
    svi = _svi(module.model, guide, num_particles=8)
    for _ in range(steps):
        svi.step()
    value, error = elbo_estimate(log_importance_weights(module.model, guide, num_samples=4096))
    return module.LOG_Z - value, error


def _kl_cell(module, make_guide, steps, seed):
    pyro.clear_param_store()
    try:
        value, error = _kl(module, make_guide(), steps, seed)
    except Exception as failure:  # a benchmark row records a failing guide and goes on
        return f"fails: {type(failure).__name__}"
    return f"{value:.3f} +- {error:.3f}"


def kl(targets=KNOWN_LOG_Z, steps=3000, seed=0):
    print(f"KL(q || p) = log Z - ELBO after {steps} steps x 8 vectorised particles, Adam 1e-2 (ELBO from 4096 draws)")
    print(f"{'target':<20} {'family':<22} {'vi-flows':>16} {'pyro':>16}")
    for target in targets:
        module = importlib.import_module(f"vi_flows.models.{target}")
        pyro_cells = {}  # Pyro's one Sylvester guide stands against all three variants: fit it once
        for family, spec in SPECS.items():
            pyro_key = "sylvester" if family.startswith("sylvester") else family
            ours = _kl_cell(module, lambda: AutoFlow(module.model, flow=spec), steps, seed)
            if pyro_key not in pyro_cells:
                pyro_cells[pyro_key] = _kl_cell(module, lambda: pyro_guide(family, module.model), steps, seed)
            print(f"{target:<20} {family:<22} {ours:>16} {pyro_cells[pyro_key]:>16}", flush=True)


def _fixed_budget_full_rank(module, seed):
    """Pyro's full-rank guide on a plain loop: 5000 steps, 8 particles, Adam 5e-3."""
    guide = AutoMultivariateNormal(module.model)
    svi = _svi(module.model, guide, lr=5e-3, num_particles=8)
    pyro.set_rng_seed(seed)
    start = time.perf_counter()
    for _ in range(5000):
        svi.step()
    seconds = time.perf_counter() - start
    reference = reference_moments(module)
    draws = Predictive(module.model, guide=guide, num_samples=20000, return_sites=list(reference))()
    # Predictive keeps singleton plate dimensions: reshape to (draws, *site shape).
    draws = {name: value.reshape((20000,) + reference[name][0].shape) for name, value in draws.items()}
    return draws, 5000, seconds


def _default_fit(module, seed):
    guide = AutoFlow(module.model)
    result = fit(module.model, guide, seed=seed, progress=False)
    return guide_moments(guide, MOMENT_DRAWS), result.num_steps, result.seconds


def _nuts(module, seed):
    pyro.set_rng_seed(seed)
    mcmc = MCMC(NUTS(module.model), num_samples=1000, warmup_steps=1000, disable_progbar=True)
    start = time.perf_counter()
    mcmc.run()
    return mcmc.get_samples(), 2000, time.perf_counter() - start


def fitting(targets=KNOWN_LOG_Z, seed=0):
    """Default ``fit(model, AutoFlow(model))`` against a fixed-budget loop and NUTS, on exact models."""
    methods = {
        "Pyro AutoMultivariateNormal, 5000 x Adam 5e-3": _fixed_budget_full_rank,
        "vi-flows fit(AutoFlow(model))": _default_fit,
        "Pyro NUTS, 1000 warm-up + 1000 draws": _nuts,
    }
    print("worst |mean error| / sd and worst |sd ratio - 1| against the exact posterior")
    print(f"{'target':<20} {'method':<46} {'mean err':>9} {'sd err':>7} {'steps':>6} {'seconds':>8}")
    for target in targets:
        module = importlib.import_module(f"vi_flows.models.{target}")
        for method, run in methods.items():
            pyro.clear_param_store()
            try:
                draws, steps, seconds = run(module, seed)
            except Exception as failure:  # a benchmark row records a failing method and goes on
                print(f"{target:<20} {method:<46} fails: {type(failure).__name__}", flush=True)
                continue
            mean_error, sd_error = worst_moment_errors(moment_errors(draws, reference_moments(module)))
            print(f"{target:<20} {method:<46} {mean_error:>9.3f} {sd_error:>7.3f} {steps:>6} {seconds:>8.1f}", flush=True)


# The zoo's models without an exact posterior, each with the model whose long NUTS run is its
# reference: the centred eight schools' funnel biases NUTS (divergences), the non-centred model's
# posterior over (mu, tau, theta) is the same and NUTS samples it well.
NUTS_TARGETS = {
    "eight_schools": "eight_schools_noncentered",
    "challenger": "challenger",
    "ordinal_simplex": "ordinal_simplex",
    "hierarchical_100": "hierarchical_100",
}


def fitting_against_nuts(
    targets=NUTS_TARGETS, seed=0, num_samples=2000, warmup_steps=1000, flow=DEFAULT_FLOW, num_steps=None, cache_dir=None
):
    """Default ``fit(model, AutoFlow(model, flow=flow))`` on the zoo's other models against a long NUTS
    run (2 chains of ``num_samples`` after ``warmup_steps``, R-hat and bulk ESS reported, cached)."""
    from vi_flows.reference import nuts_reference

    print(f"{flow}: worst |mean error| / sd and worst |sd ratio - 1| against NUTS, 2 x {num_samples} draws")
    print(f"{'target':<18} {'reference':<26} {'R-hat':>6} {'ESS':>6} {'NUTS s':>7} {'mean err':>9} {'sd err':>7} {'steps':>6} {'seconds':>8}")
    for target, reference_target in targets.items():
        module = importlib.import_module(f"vi_flows.models.{target}")
        reference_model = importlib.import_module(f"vi_flows.models.{reference_target}").model
        draws, report = nuts_reference(
            reference_model, num_samples=num_samples, warmup_steps=warmup_steps, seed=seed, cache_dir=cache_dir, quiet=True
        )
        pyro.clear_param_store()
        guide = AutoFlow(module.model, flow=flow)
        result = fit(module.model, guide, seed=seed, progress=False, num_steps=num_steps)
        fitted = guide.sample_constrained(100_000)  # the reference's own error (ESS ~ 10^3) dominates
        # Deterministic sites (the non-centred model's theta) come from the model at each draw.
        draws = Predictive(reference_model, posterior_samples=draws, return_sites=list(fitted))()
        draws = {name: value.reshape((-1,) + fitted[name].shape[1:]) for name, value in draws.items()}
        reference = {name: (values.mean(0), values.std(0)) for name, values in draws.items()}
        mean_error, sd_error = worst_moment_errors(moment_errors(fitted, reference))
        print(
            f"{target:<18} {reference_target:<26} {report['worst_rhat']:>6.3f} {report['smallest_ess']:>6.0f} "
            f"{report['seconds']:>7.1f} {mean_error:>9.3f} {sd_error:>7.3f} {result.num_steps:>6} {result.seconds:>8.1f}",
            flush=True,
        )


FIT_ROW_HEADER = f"{'KL':>16} {'mean err':>9} {'sd err':>7} {'steps':>6} {'seconds':>8}"


def _fit_row(module, guide_options, seed, num_steps=None, **fit_options):
    """Fit ``AutoFlow(module.model, **guide_options)`` with the default ``fit``; return its KL
    (4096 draws), worst moment errors against the exact posterior (``MOMENT_DRAWS`` draws), steps and seconds."""
    pyro.clear_param_store()
    guide = AutoFlow(module.model, **guide_options)
    result = fit(module.model, guide, seed=seed, progress=False, num_steps=num_steps, **fit_options)
    value, error = elbo_estimate(log_importance_weights(module.model, guide, num_samples=4096))
    errors = moment_errors(guide_moments(guide, MOMENT_DRAWS), reference_moments(module))
    mean_error, sd_error = worst_moment_errors(errors)
    return (
        f"{f'{module.LOG_Z - value:.4f} +- {error:.4f}':>16} "
        f"{mean_error:>9.3f} {sd_error:>7.3f} {result.num_steps:>6} {result.seconds:>8.1f}"
    )


def sticking(targets=KNOWN_LOG_Z, seeds=(0, 1, 2), dims=(2, 10, 20, 50), steps=200, num_steps=None):
    """The default fit with and without ``sticking_the_landing`` (KL and moment errors against the
    exact posterior, several seeds), and what the path-derivative gradient costs per step."""
    print(f"ms per step of fit's compiled step (64 particles, default flow), mean of {steps} steps")
    print(f"{'D':>4} {'plain':>8} {'stl':>8} {'ratio':>6}")
    for dim in dims:
        model, cost = _gaussian_model(dim), []
        for stl in (False, True):
            pyro.clear_param_store()
            step = _compiled_step(model, AutoFlow(model, init="prior"), num_particles=64, sticking_the_landing=stl)
            for _ in range(20):
                step(1e-3)
            start = time.perf_counter()
            for _ in range(steps):
                step(1e-3)
            cost.append((time.perf_counter() - start) / steps * 1e3)
        print(f"{dim:>4} {cost[0]:>8.2f} {cost[1]:>8.2f} {cost[1] / cost[0]:>6.1f}", flush=True)
    print(f"default fit(model, AutoFlow(model), sticking_the_landing=...); KL from 4096 draws, moments from {MOMENT_DRAWS}")
    print(f"{'target':<20} {'stl':<5} {'seed':>4} {FIT_ROW_HEADER}")
    for target in targets:
        module = importlib.import_module(f"vi_flows.models.{target}")
        for stl in (False, True):
            for seed in seeds:
                row = _fit_row(module, {}, seed, num_steps, sticking_the_landing=stl)
                print(f"{target:<20} {stl!s:<5} {seed:>4} {row}", flush=True)


CANDIDATE_FLOWS = (
    *SPECS.values(),
    "householder*8",
    "iaf*4",
    "iaf*2+planar*8",
    "householder*4+iaf*2",
    "planar*8+iaf*2",
    "planar*16+iaf*2",
    "planar*8+iaf*4",
)


def choose(specs=CANDIDATE_FLOWS, targets=("banana", "funnel", "gaussian_mixture"), seeds=(0,), num_steps=None):
    """KL and moment errors of ``fit(model, AutoFlow(model, flow=spec))`` for candidate default flows."""
    print(f"the default fit (no lr or step count) of AutoFlow(model, flow=...); KL from 4096 draws, moments from {MOMENT_DRAWS}")
    print(f"{'flow':<24} {'target':<20} {'seed':>4} {FIT_ROW_HEADER}")
    for spec in specs:
        for target in targets:
            module = importlib.import_module(f"vi_flows.models.{target}")
            for seed in seeds:
                print(f"{spec:<24} {target:<20} {seed:>4} {_fit_row(module, {'flow': spec}, seed, num_steps)}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__.split("\n")[0])
    parser.add_argument("which", nargs="?", default="all", choices=["speed", "kl", "fit", "choose", "stl", "all"])
    parser.add_argument("--steps", type=int, default=3000, help="SVI steps per fit in the KL table")
    parser.add_argument("--flows", help="comma-separated flow specs for choose (default: its candidates)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds for choose")
    parser.add_argument("--targets", default="banana,funnel,gaussian_mixture", help="comma-separated zoo models for choose")
    args = parser.parse_args(argv)
    if args.which in ("speed", "all"):
        speed()
    if args.which in ("kl", "all"):
        kl(steps=args.steps)
    if args.which in ("fit", "all"):
        fitting()
        fitting_against_nuts()
    if args.which in ("choose", "all"):
        specs = tuple(args.flows.split(",")) if args.flows else CANDIDATE_FLOWS
        choose(specs, targets=tuple(args.targets.split(",")), seeds=tuple(int(seed) for seed in args.seeds.split(",")))
    if args.which in ("stl", "all"):
        sticking()


if __name__ == "__main__":
    main()
