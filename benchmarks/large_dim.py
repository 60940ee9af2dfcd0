"""The default flow at large dimension: ``python benchmarks/large_dim.py [--dims 100 300 1000] [--widths default 3D+10]``.

On a conjugate linear regression with P coefficients and 2P data (exact posterior and log Z; the
noise variance scales every coefficient, so the posterior is a Student-t, not a Gaussian), prints
for the default ``AutoFlow`` with each IAF hidden width (``default``: the library's rule; ``3D+10``:
the width before it; or a number) its parameters, seconds to build it (the Laplace start), ms per
step of a ``fit`` of ``--steps`` steps (2000; 0: its own stopping rule; compiled, 64 particles;
compiling excluded), peak memory, and KL(q || p) = log Z - ELBO (4096 draws) at the start and after
the fit; beside NumPyro's ``AutoIAFNormal(num_flows=2)`` (``jit(svi.update)``, 64 particles) at the
same P. Each cell runs in its own process, for its peak memory.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import pyro
import torch

from vi_flows import AutoFlow, fit
from vi_flows.fitting import FittingError
from vi_flows.diagnostics import log_importance_weights
from vi_flows.models._conjugate import ConjugateRegression

STEPS, PARTICLES = 2000, 64


def _kl(target, guide):
    with torch.no_grad():
        return target.log_z - log_importance_weights(target.model, guide, num_samples=4096).mean().item()


def ours(num_coefficients, width, steps=STEPS):
    target = ConjugateRegression.simulated(num_coefficients)
    dim = num_coefficients + 1
    options = {} if width == "default" else {"iaf": {"hidden_dim": 3 * dim + 10 if width == "3D+10" else int(width)}}
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    start = time.perf_counter()
    guide = AutoFlow(target.model, **options)
    guide()
    build_seconds = time.perf_counter() - start
    kl_start = _kl(target, guide)
    try:
        result = fit(target.model, guide, num_steps=steps or None, num_particles=PARTICLES, seed=0, progress=False)
    except FittingError as error:
        return {"parameters": sum(param.numel() for param in guide.parameters()), "diverged_at": len(error.result.losses)}
    return {
        "parameters": sum(param.numel() for param in guide.parameters()),
        "build_s": build_seconds,
        "ms_per_step": (result.seconds - result.compile_seconds) / result.num_steps * 1e3,
        "compile_s": result.compile_seconds,
        "rollbacks": len(result.rollbacks),
        "steps": result.num_steps,
        "seconds": result.seconds,
        "kl_start": kl_start,
        "kl_fit": _kl(target, guide),
    }


def numpyro_iaf(num_coefficients):
    import numpyro
    import numpyro.distributions as ndist
    from numpyro.infer import autoguide

    from numpyro_peer import their_ms_per_step

    target = ConjugateRegression.simulated(num_coefficients)
    design, response = (target.design.numpy(), target.response.numpy())

    def model():
        noise_var = numpyro.sample("noise_var", ndist.InverseGamma(target.prior_shape, target.prior_rate))
        with numpyro.plate("coefficient", design.shape[1]):
            coefficients = numpyro.sample("coefficients", ndist.Normal(0.0, target.prior_scale * noise_var**0.5))
        with numpyro.plate("data", design.shape[0]):
            numpyro.sample("y", ndist.Normal(coefficients @ design.T, noise_var**0.5), obs=response)

    guide = lambda model: autoguide.AutoIAFNormal(model, num_flows=2)  # noqa: E731
    return {"ms_per_step": their_ms_per_step(model, guide, PARTICLES, 200)}


def _cell(*arguments):
    command = [sys.executable, __file__, "--cell", *map(str, arguments)]
    report = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--widths", nargs="+", default=["default", "3D+10"])
    parser.add_argument("--steps", type=int, default=STEPS, help="steps per fit; 0: fit's own stopping rule")
    parser.add_argument("--cell", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cell:
        kind, size, *rest = args.cell
        report = numpyro_iaf(int(size)) if kind == "numpyro" else ours(int(size), rest[0], int(rest[1]))
        print(json.dumps({**report, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return
    print("P | guide | parameters | build s | compile s | ms/step | peak MB | KL start | KL after the fit (steps, seconds) | rollbacks | ms/step ratio to NumPyro IAF(2)")
    for size in args.dims:
        theirs = _cell("numpyro", size)
        print(f"{size} | NumPyro AutoIAFNormal(2) | | | | {theirs['ms_per_step']:.1f} | {theirs['peak_mb']:.0f} | | |", flush=True)
        for width in args.widths:
            mine = _cell("ours", size, width, args.steps)
            if "diverged_at" in mine:
                print(f"{size} | default AutoFlow, IAF width {width} | {mine['parameters'] / 1e6:.2f} M | fit diverged at step {mine['diverged_at']}")
                continue
            print(
                f"{size} | default AutoFlow, IAF width {width} | {mine['parameters'] / 1e6:.2f} M | {mine['build_s']:.1f} | {mine['compile_s']:.1f} | "
                f"{mine['ms_per_step']:.1f} | {mine['peak_mb']:.0f} | {mine['kl_start']:.3f} | {mine['kl_fit']:.3f} ({mine['steps']}, {mine['seconds']:.0f} s) | {mine['rollbacks']} | "
                f"{mine['ms_per_step'] / theirs['ms_per_step']:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
