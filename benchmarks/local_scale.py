"""Local latents at scale: ``python benchmarks/local_scale.py [step|fit|known-tau|export|all]``.

``step`` prints milliseconds per step and peak memory of the hierarchical normal model of issue 19
(``mu``, ``tau`` global, one ``theta`` per group, 5 observations per group) against the number of
groups N at a subsample of B = 256, for ``AutoFlow`` (its per-item local posteriors, the step as
``fit`` takes it, compiled, and as Pyro's ``SVI`` takes it; the amortised ones as ``fit`` takes it)
next to Pyro's ``AutoNormal`` with ``create_plates`` subsampling, each configuration in its own
process (for its peak memory). ``fit [local] [seeds...]`` runs the default ``fit(model,
AutoFlow(model, local=local))`` at N = 100,000 (``--groups``) subsampled on each seed, and reports
its time, peak memory, the subsample's noise left (``FitResult.subsample_noise``), the rows' shift
(``FitResult.item_shift``) and the globals' posterior beside the exact one and (first seed, unless
``--no-mean-field``) a full-batch mean-field fit's; ``--no-control-variate`` fits without ``fit``'s
control variate, ``--no-refit`` without its refits of the items' rows. ``known-tau [local]
[seeds...]`` fits the model with tau known (0.5) and compares mu and 1000 random groups' theta with
the closed-form posterior. ``export [draws]`` times ``to_inference_data`` and ``log_density_at``
over every group of the subsampled model (set up, not fitted).
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from vi_flows import AutoFlow, fit, guide_moments, log_density_at, sample_constrained, to_inference_data
from vi_flows.elbo_step import ELBOStep
from vi_flows.models._hierarchical import equal_groups_moments, known_tau_moments
from vi_flows.pyro_internals import max_plate_nesting

PER_GROUP, SUBSAMPLE = 5, 256


def make_data(num_groups, seed=0):
    """``(PER_GROUP, N)`` observations: group means 1 + 0.5 z, unit noise."""
    generator = torch.Generator().manual_seed(seed)
    means = 1.0 + 0.5 * torch.randn(num_groups, generator=generator)
    return (means.unsqueeze(-1) + torch.randn(num_groups, PER_GROUP, generator=generator)).T.contiguous()


def exact_posterior(data):
    """``{"tau": [mean, sd], "mu": [mean, sd]}`` of ``make_model``'s posterior (quadrature over tau)."""
    moments = equal_groups_moments(data.mean(0), 1 / PER_GROUP, 5.0, lambda tau: -(tau**2) / 50)
    return {name: [mean.item(), sd.item()] for name, (mean, sd) in moments.items()}


def make_model(num_groups, subsample_size=SUBSAMPLE, seed=0, known_tau=None):
    """The model on ``make_data``'s groups; with ``known_tau``, tau is that constant, not a latent."""
    data = make_data(num_groups, seed)

    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = known_tau if known_tau is not None else pyro.sample("tau", dist.HalfNormal(5.0))
        with pyro.plate("groups", num_groups, subsample_size=subsample_size, dim=-1) as index:
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            with pyro.plate("observations", PER_GROUP, dim=-2):
                pyro.sample("y", dist.Normal(theta, 1.0), obs=data.index_select(-1, index))

    return model


def one_step_time(kind, num_groups, steps=300, warmup=50):
    """ms per step and peak resident MB of one configuration (run in a fresh process)."""
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    model = make_model(num_groups)
    if kind == "AutoNormal":
        guide = AutoNormal(model, create_plates=lambda: pyro.plate("groups", num_groups, subsample_size=SUBSAMPLE, dim=-1))
        svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 1e-2}), Trace_ELBO())
        step = svi.step
    elif kind == "AutoFlow (SVI)":
        guide = AutoFlow(model)
        svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 1e-2}), Trace_ELBO())
        step = svi.step
    else:  # AutoFlow as fit steps it, compiled, one particle as SVI's
        guide = AutoFlow(model, local="amortized" if "amortized" in kind else "auto")
        nesting = max_plate_nesting(model, guide)
        elbo_step = ELBOStep(model, guide, num_particles=1, max_plate_nesting=nesting, compile=True, threads=1)

        def step():
            return elbo_step(1e-2)

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    ms = 1e3 * (time.perf_counter() - start) / steps
    return {"ms_per_step": ms, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def step_table(sizes=(10**3, 10**4, 10**5, 10**6), kinds=("AutoNormal", "AutoFlow (SVI)", "AutoFlow (fit)", "amortized (fit)")):
    print(f"ms per step and peak resident memory, B = {SUBSAMPLE}, one particle, one thread")
    print(f"{'N':>9} " + " ".join(f"{kind:>24}" for kind in kinds) + "   fits / AutoNormal")
    for size in sizes:
        row = {kind: _in_process("one", kind, size) for kind in kinds}
        cells = " ".join(f"{row[k]['ms_per_step']:8.2f} ms {row[k]['peak_mb']:7.0f} MB  " for k in kinds)
        ratios = " ".join(f"{row[kind]['ms_per_step'] / row[kinds[0]]['ms_per_step']:6.2f}" for kind in kinds[2:])
        print(f"{size:>9} {cells} {ratios}", flush=True)


def fit_at_scale(num_groups=10**5, local="auto", seed=0, with_mean_field=True, control_variate="auto", refit_items=True):
    """The default fit (on ``seed``), subsampled, against a full-batch mean-field fit of the same model."""
    torch.set_num_threads(1)
    pyro.clear_param_store()
    model = make_model(num_groups)
    guide = AutoFlow(model, local=local)
    result = fit(model, guide, seed=seed, progress=False, control_variate=control_variate, refit_items=refit_items)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    moments = guide_moments(guide, 4000, chunk_size=100)  # draws x items at a time
    report = {
        "local": local,
        "seed": seed,
        "local_sites": guide.local_sites,
        "seconds": result.seconds,
        "compile_seconds": result.compile_seconds,
        "steps": result.num_steps,
        "stop": result.stop_reason,
        "subsample_noise": result.subsample_noise,
        "item_shift": result.item_shift,
        "tau": [moments["tau"][0].item(), moments["tau"][1].item()],
        "mu": [moments["mu"][0].item(), moments["mu"][1].item()],
        "peak_mb": peak_mb,
    }
    report["exact"] = exact_posterior(make_data(num_groups))
    report["errors_in_exact_sds"] = {name: (report[name][0] - mean) / sd for name, (mean, sd) in report["exact"].items()}
    report["sd_ratios"] = {name: report[name][1] / sd for name, (mean, sd) in report["exact"].items()}
    if not with_mean_field:
        return report
    pyro.clear_param_store()
    full = make_model(num_groups, subsample_size=None)
    mean_field = AutoNormal(full)
    start = time.perf_counter()
    fit(full, mean_field, num_particles=1, num_steps=4000, lr=0.05, seed=0, progress=False)
    draws = pyro.infer.Predictive(full, guide=mean_field, num_samples=4000, return_sites=["tau", "mu"])()
    report["mean_field"] = {name: [draws[name].mean().item(), draws[name].std().item()] for name in ("tau", "mu")}
    report["mean_field_seconds"] = time.perf_counter() - start
    return report


def known_tau_at_scale(num_groups=10**5, local="auto", seed=0, num_items=1000, num_draws=10_000):
    """Issue 19's exact check: with tau known (0.5, the data's), the default fit (on ``seed``) against
    the closed-form posterior, in mu and in ``num_items`` random groups' theta: the worst error of a
    mean in posterior sds and the worst sd ratio's distance from 1, from ``num_draws`` guide draws."""
    torch.set_num_threads(1)
    pyro.clear_param_store()
    model = make_model(num_groups, known_tau=0.5)
    guide = AutoFlow(model, local=local)
    result = fit(model, guide, seed=seed, progress=False)
    moments = guide_moments(guide, num_draws, chunk_size=250)
    exact = known_tau_moments(make_data(num_groups).mean(0), 1 / PER_GROUP, 5.0, 0.5)
    items = torch.randperm(num_groups, generator=torch.Generator().manual_seed(seed))[:num_items]
    report = {"local": local, "seed": seed, "seconds": result.seconds, "steps": result.num_steps, "subsample_noise": result.subsample_noise}
    for name in ("mu", "theta"):
        (mean, sd), (exact_mean, exact_sd) = moments[name], exact[name]
        if name == "theta":
            mean, sd, exact_mean = mean[items], sd[items], exact_mean[items]
        report[name] = {"worst_error_in_sds": ((mean - exact_mean) / exact_sd).abs().max().item(), "worst_sd_ratio_error": (sd / exact_sd - 1).abs().max().item()}
    return report


def export_at_scale(num_groups=10**5, num_draws=100):
    """Seconds and peak memory of the ArviZ export and of the guide's density over every group."""
    torch.set_num_threads(1)
    model = make_model(num_groups)
    guide = AutoFlow(model).setup()
    set_up_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    exported = to_inference_data(guide, model, num_samples=num_draws)
    report = {"groups": num_groups, "draws": num_draws, "export_seconds": time.perf_counter() - start, "theta": list(exported.posterior["theta"].shape)}
    report.update(peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, set_up_mb=set_up_mb)
    draws = sample_constrained(guide, num_draws)
    start = time.perf_counter()
    log_density_at(guide, draws)
    report["log_density_seconds"] = time.perf_counter() - start
    return report


def _in_process(what, kind, size):
    command = [sys.executable, __file__, "_one", what, kind, str(size)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["step", "fit", "known-tau", "export", "all", "_one"])
    parser.add_argument("rest", nargs="*")
    parser.add_argument("--groups", type=int, default=10**5, help="fit: the number of groups N")
    parser.add_argument("--no-control-variate", action="store_true", help="fit: without fit's control variate")
    parser.add_argument("--no-refit", action="store_true", help="fit: without fit's refits of the items' rows")
    parser.add_argument("--no-mean-field", action="store_true", help="fit: without the full-batch mean-field fit")
    args = parser.parse_args(argv)
    if args.what == "_one":
        print(json.dumps(one_step_time(args.rest[1], int(args.rest[2]))))
        return
    if args.what in ("step", "all"):
        step_table()
    if args.what == "export":
        print(json.dumps(export_at_scale(args.groups, int(args.rest[0]) if args.rest else 100)))
        return
    local, *seeds = args.rest or ["auto"]
    if args.what == "known-tau":
        for seed in seeds or ["0"]:
            print(json.dumps(known_tau_at_scale(args.groups, local, int(seed))), flush=True)
    if args.what in ("fit", "all"):
        control_variate = False if args.no_control_variate else "auto"
        for index, seed in enumerate(seeds or ["0"]):
            with_mean_field = index == 0 and not args.no_mean_field
            report = fit_at_scale(args.groups, local, int(seed), with_mean_field, control_variate, not args.no_refit)
            print(json.dumps(report, indent=1), flush=True)


if __name__ == "__main__":
    main()
