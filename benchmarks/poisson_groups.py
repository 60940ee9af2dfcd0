"""A subsampled hierarchy that is not conjugate: ``python benchmarks/poisson_groups.py [seeds...]``.

``models/_poisson.py``'s hierarchy (a LogNormal rate per group, a Poisson count of it) on
``--groups`` simulated groups, the default ``fit(model, AutoFlow(model, local=--local), counts,
--subsample)`` on each seed, with ``fit``'s refits of the items' rows and (``--no-refit``) without:
its time, the check at its end (``FitResult.item_shift``) and loc's posterior against the optimum
of the guide's family (each group's best Gaussian, on a grid over loc), in that optimum's sds. One thread.
"""

import argparse
import json
import time

import pyro
import torch

from vi_flows import AutoFlow, fit
from vi_flows.models._poisson import collapsed_optimum, hierarchy, simulate


def fit_once(counts, subsample_size, seed, refit_items, local="auto"):
    pyro.clear_param_store()
    guide = AutoFlow(hierarchy, local=local)
    start = time.perf_counter()
    result = fit(hierarchy, guide, counts, subsample_size, seed=seed, progress=False, refit_items=refit_items)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        draws = guide.get_posterior().sample((4000,)).squeeze(-1).double()
    mean, sd = collapsed_optimum(counts, torch.linspace(-1.0, 2.0, 30001))
    return {
        "seed": seed,
        "local": local,
        "refit_items": refit_items,
        "seconds": seconds,
        "compile_seconds": result.compile_seconds,
        "steps": result.num_steps,
        "subsample_noise": result.subsample_noise,
        "item_shift": result.item_shift,
        "loc": [draws.mean().item(), draws.std().item()],
        "optimum": [mean.item(), sd.item()],
        "error_in_sds": ((draws.mean() - mean) / sd).item(),
        "sd_ratio": (draws.std() / sd).item(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--groups", type=int, default=20_000)
    parser.add_argument("--subsample", type=int, default=64)
    parser.add_argument("--local", default="auto", choices=["auto", "per-item", "amortized"])
    parser.add_argument("--no-refit", action="store_true", help="without fit's refits of the items' rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    counts = simulate(args.groups)
    for seed in args.seeds:
        print(json.dumps(fit_once(counts, args.subsample, seed, not args.no_refit, args.local)), flush=True)


if __name__ == "__main__":
    main()
