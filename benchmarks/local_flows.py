"""Local flows against the local Gaussian: ``python benchmarks/local_flows.py [steps] [seeds]``.

The zoo's ``banana_items``: a global ``mu ~ N(0, 1)``, per item ``z ~ N((mu, mu), I)`` and
``y ~ N(z2 - z1^2, 0.3)`` with ``y = 1``, 8 items, so that each item's posterior is a curved ridge
that no Gaussian fits. Prints, for each local flow and local mode, the
gap between the log evidence (by quadrature) and the fitted ELBO per item, over seeds, and the
seconds per fit (eager steps, 8 particles, the global flow ``affine``).
"""

import statistics
import sys
import time

import pyro

from vi_flows import AutoFlow, fit
from vi_flows.diagnostics import elbo_estimate, log_importance_weights
from vi_flows.models.banana_items import DATA, LOG_Z, model

FLOWS = (None, "affine", "planar*2", "iaf*2", "sylvester-orthogonal*2", "sylvester-householder*2", "sylvester-triangular*2")


def gap_and_seconds(local_flow, mode, steps, seed):
    pyro.clear_param_store()
    guide = AutoFlow(model, flow="affine", local=mode, local_flow=local_flow)
    start = time.perf_counter()
    fit(model, guide, num_steps=steps, num_particles=8, seed=seed, progress=False, compile=False, threads=1)
    seconds = time.perf_counter() - start
    elbo, _ = elbo_estimate(log_importance_weights(model, guide, num_samples=4000))
    return (LOG_Z - elbo) / len(DATA), seconds


def main(steps=1000, seeds=3):
    print(f"| local flow | mode | gap per item, seeds 0-{seeds - 1} | median gap | seconds per fit |")
    print("| --- | --- | --- | --- | --- |")
    for mode in ("per-item", "amortized"):
        for local_flow in FLOWS:
            runs = [gap_and_seconds(local_flow, mode, steps, seed) for seed in range(seeds)]
            gaps = " / ".join(f"{gap:.3f}" for gap, _ in runs)
            median = statistics.median(gap for gap, _ in runs)
            seconds = statistics.median(second for _, second in runs)
            print(f"| {local_flow or 'none (Gaussian)'} | {mode} | {gaps} | {median:.3f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:]))
