"""vi-flows' ``fit`` step against NumPyro's jit-compiled SVI, measured interleaved in one run:
``python benchmarks/numpyro_peer.py [step|kl|grid|all]`` (NumPyro and JAX: ``pip install .[bench]``).

``step`` prints the milliseconds per step on Neal's funnel at D = 10 and 100 with 1, 16 and 64
vectorised particles: ``fit``'s compiled step (:class:`~vi_flows.elbo_step.ELBOStep`, threads
chosen as ``fit`` chooses them) on Pyro's ``AutoDiagonalNormal``, ``AutoFlow(flow="iaf*2")`` and
the default ``AutoFlow``, beside NumPyro's ``jit(svi.update)`` on ``AutoDiagonalNormal``,
``AutoIAFNormal(num_flows=2)`` and ``AutoBNAFNormal``, and the ratio (ours / theirs).

``kl`` prints the seconds, compiling included, until KL(q || p) = log Z - ELBO (from 4096 draws,
checked every 250 steps, the checks not timed) is at most 0.05 on the 10-D funnel and the banana:
the default ``AutoFlow`` with ``fit``'s default step (64 particles, learning rate 1e-2 after its
warm-up; ``--compile background``: compiling in a worker process meanwhile), from an empty Inductor
cache (a fresh process each) and a warm one, against NumPyro's IAF and BNAF guides, whose 250-step
blocks run in one ``lax.scan``.
``grid`` prints the KL that NumPyro's flow guides reach in 10000 steps over learning rates and
particle counts, which chose the settings of ``kl``.
"""

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as ndist
import pyro
import pyro.distributions as dist
import torch
from numpyro.infer import SVI as NumPyroSVI
from numpyro.infer import Trace_ELBO as NumPyroTraceELBO
from numpyro.infer import autoguide as numpyro_autoguide
from pyro.infer.autoguide import AutoDiagonalNormal

from vi_flows.autoflow import AutoFlow
from vi_flows.diagnostics import log_importance_weights
from vi_flows.elbo_step import ELBOStep
from vi_flows.pyro_internals import max_plate_nesting
from vi_flows.schedule import LearningRate
from vi_flows.threads import intra_op_threads

KL_TARGET, KL_DRAWS, CHECK_EVERY, MAX_STEPS = 0.05, 4096, 250, 10_000


def pyro_funnel(dim):
    def model():
        y = pyro.sample("y", dist.Normal(0.0, 3.0))
        with pyro.plate("coordinates", dim - 1):
            pyro.sample("x", dist.Normal(0.0, (y / 2).exp()))

    return model


def numpyro_funnel(dim):
    def model():
        y = numpyro.sample("y", ndist.Normal(0.0, 3.0))
        with numpyro.plate("coordinates", dim - 1):
            numpyro.sample("x", ndist.Normal(0.0, jnp.exp(y / 2)))

    return model


def pyro_banana():
    x1 = pyro.sample("x1", dist.Normal(0.0, 10.0))
    pyro.sample("x2", dist.Normal(0.1 * (x1**2 - 100), 1.0))


def numpyro_banana():
    x1 = numpyro.sample("x1", ndist.Normal(0.0, 10.0))
    numpyro.sample("x2", ndist.Normal(0.1 * (x1**2 - 100), 1.0))


# Guides side by side: (ours, theirs); both funnel and banana have log Z = 0.
STEP_GUIDES = {
    "mean-field": (AutoDiagonalNormal, numpyro_autoguide.AutoDiagonalNormal),
    "iaf*2 / AutoIAFNormal(2)": (
        lambda model: AutoFlow(model, flow="iaf*2", non_centring=False),
        lambda model: numpyro_autoguide.AutoIAFNormal(model, num_flows=2),
    ),
    "default / AutoBNAFNormal": (AutoFlow, numpyro_autoguide.AutoBNAFNormal),
}
NUMPYRO_GRID_GUIDES = {
    "IAF(2)": lambda model: numpyro_autoguide.AutoIAFNormal(model, num_flows=2),
    "IAF(4, [32, 32])": lambda model: numpyro_autoguide.AutoIAFNormal(model, num_flows=4, hidden_dims=[32, 32]),
    "BNAF(1)": numpyro_autoguide.AutoBNAFNormal,
    "BNAF(2, [16, 16])": lambda model: numpyro_autoguide.AutoBNAFNormal(model, num_flows=2, hidden_factors=[16, 16]),
}
# NumPyro's settings for the time to KL 0.05 (guide, learning rate, particles): the best on the
# funnel and on the banana of ``grid`` (none reached KL 0.05 in 10000 steps; RESULTS.md).
NUMPYRO_KL_GUIDES = {
    "IAF(2), 3e-3, 64": (NUMPYRO_GRID_GUIDES["IAF(2)"], 3e-3, 64),
    "BNAF(1), 3e-3, 64": (NUMPYRO_GRID_GUIDES["BNAF(1)"], 3e-3, 64),
    "BNAF(2, [16, 16]), 1e-2, 64": (NUMPYRO_GRID_GUIDES["BNAF(2, [16, 16])"], 1e-2, 64),
}
TARGETS = {"funnel": (pyro_funnel(10), numpyro_funnel(10)), "banana": (pyro_banana, numpyro_banana)}


def _our_step(model, make_guide, num_particles, seed=0, sticking_the_landing="auto", compile=True):
    """``fit``'s step for a fresh guide (compiled before the first step, or as ``compile`` says), and the guide."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = make_guide(model)
    nesting = max_plate_nesting(model, guide)
    options = dict(compile=compile, threads="auto", sticking_the_landing=sticking_the_landing)
    return ELBOStep(model, guide, num_particles=num_particles, max_plate_nesting=nesting, **options), guide


def our_ms_per_step(model, make_guide, num_particles, steps, sticking_the_landing):
    step, _ = _our_step(model, make_guide, num_particles, sticking_the_landing=sticking_the_landing)
    with intra_op_threads(step.num_threads):
        for _ in range(20):
            step(1e-3)
        start = time.perf_counter()
        for _ in range(steps):
            step(1e-3)
    return (time.perf_counter() - start) / steps * 1e3, step.num_threads, step.compile_seconds


def their_ms_per_step(model, make_guide, num_particles, steps):
    elbo = NumPyroTraceELBO(num_particles=num_particles)
    svi = NumPyroSVI(model, make_guide(model), numpyro.optim.Adam(1e-3), elbo)
    state = svi.init(jax.random.PRNGKey(0))
    update = jax.jit(svi.update)
    for _ in range(20):
        state, loss = update(state)
    loss.block_until_ready()
    start = time.perf_counter()
    for _ in range(steps):
        state, loss = update(state)
    loss.block_until_ready()
    return (time.perf_counter() - start) / steps * 1e3


def step_table(dims=(10, 100), particle_counts=(1, 16, 64), steps=300):
    print("ms per step on Neal's funnel; ours: fit's compiled step with the plain gradient, as theirs, and with")
    print("fit's default (the path derivative up to D = 20); theirs: NumPyro's jit(svi.update); ratio: ours / theirs")
    print(f"{'D':>4} {'particles':>9} {'guide':<26} {'ours':>7} {'default':>7} {'theirs':>7} {'ratio':>6} threads compile s")
    for dim in dims:
        for num_particles in particle_counts:
            for name, (ours, theirs) in STEP_GUIDES.items():
                model = pyro_funnel(dim)
                our_ms, threads, _ = our_ms_per_step(model, ours, num_particles, steps, sticking_the_landing=False)
                default_ms, _, compile_seconds = our_ms_per_step(model, ours, num_particles, steps, sticking_the_landing="auto")
                their_ms = their_ms_per_step(numpyro_funnel(dim), theirs, num_particles, steps)
                print(
                    f"{dim:>4} {num_particles:>9} {name:<26} {our_ms:>7.3f} {default_ms:>7.3f} {their_ms:>7.3f} "
                    f"{our_ms / their_ms:>6.2f} {threads:>7} {compile_seconds:>9.1f}",
                    flush=True,
                )


def our_seconds_to_kl(model, seed, compile="auto"):
    """Seconds (compiling included, KL checks excluded) until the default AutoFlow's KL <= KL_TARGET
    under fit's step (compiled as ``compile`` says: fit's default, or ``"background"``) and default
    learning rate, the steps taken and the last KL; None seconds where MAX_STEPS pass first."""
    start = time.perf_counter()
    step, guide = _our_step(model, AutoFlow, 64, seed, compile=compile)
    learning_rate = LearningRate(1e-2, warmup_steps=100)
    elapsed = 0.0
    try:
        with intra_op_threads(step.num_threads):
            for block in range(MAX_STEPS // CHECK_EVERY):
                for step_index in range(block * CHECK_EVERY, (block + 1) * CHECK_EVERY):
                    step(learning_rate(step_index))
                elapsed += time.perf_counter() - start
                with torch.no_grad():
                    kl = -log_importance_weights(model, guide, num_samples=KL_DRAWS).mean().item()
                if kl <= KL_TARGET:
                    return elapsed, (block + 1) * CHECK_EVERY, kl
                start = time.perf_counter()
    finally:
        step.close(wait=True)  # untimed: a worker still compiling fills the cache for the warm runs
    return None, MAX_STEPS, kl


def their_seconds_to_kl(model, make_guide, lr, num_particles, seed):
    """As :func:`our_seconds_to_kl` for NumPyro's SVI, ``CHECK_EVERY`` steps per ``lax.scan``."""
    start = time.perf_counter()
    guide = make_guide(model)
    svi = NumPyroSVI(model, guide, numpyro.optim.Adam(lr), NumPyroTraceELBO(num_particles=num_particles))
    state = svi.init(jax.random.PRNGKey(seed))
    block = jax.jit(lambda state: jax.lax.scan(lambda s, _: svi.update(s), state, None, length=CHECK_EVERY))
    kl_loss = jax.jit(lambda params, key: NumPyroTraceELBO(num_particles=KL_DRAWS).loss(key, params, model, guide))
    elapsed = 0.0
    for index in range(MAX_STEPS // CHECK_EVERY):
        state, losses = block(state)
        losses.block_until_ready()
        elapsed += time.perf_counter() - start
        kl = float(kl_loss(svi.get_params(state), jax.random.PRNGKey(index)))
        if math.isfinite(kl) and kl <= KL_TARGET:
            return elapsed, (index + 1) * CHECK_EVERY, kl
        start = time.perf_counter()
    return None, MAX_STEPS, kl


def _seconds(value, steps, kl):
    return f"never, KL {kl:.3f} at {steps}" if value is None else f"{value:.1f} s ({steps})"


def _our_seconds_to_kl_cold_and_warm(target, seed, compile):
    """:func:`our_seconds_to_kl` in a fresh process with an empty Inductor cache (a process keeps
    compiled kernels in memory, so a second fit in it would not start cold), then here with that
    cache, which the first filled."""
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache:
        command = [sys.executable, __file__, "kl-ours", "--target", target, "--seeds", str(seed), "--compile", compile]
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        cold = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            warm = _seconds(*our_seconds_to_kl(TARGETS[target][0], seed, compile))
        finally:
            if previous is None:
                del os.environ["TORCHINDUCTOR_CACHE_DIR"]
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
    return cold, warm


def kl_table(seeds=(0, 1, 2), targets=tuple(TARGETS), compile="auto"):
    print(f"seconds (steps) to KL <= {KL_TARGET}, compiling included (compile={compile!r}); never: not within {MAX_STEPS} steps")
    print("vi-flows cold: a fresh process with an empty Inductor cache; warm: then this process with that cache")
    header = f"{'target':<8} {'seed':>4} {'vi-flows cold':>18} {'vi-flows warm':>18} "
    print(header + " ".join(f"{name:>28}" for name in NUMPYRO_KL_GUIDES))
    for target in targets:
        _, theirs = TARGETS[target]
        for seed in seeds:
            row = list(_our_seconds_to_kl_cold_and_warm(target, seed, compile))
            for make_guide, lr, num_particles in NUMPYRO_KL_GUIDES.values():
                row.append(_seconds(*their_seconds_to_kl(theirs, make_guide, lr, num_particles, seed)))
            print(f"{target:<8} {seed:>4} {row[0]:>18} {row[1]:>18} " + " ".join(f"{cell:>28}" for cell in row[2:]), flush=True)


def numpyro_grid(seed=0):
    """KL after MAX_STEPS steps (16384 draws) of NumPyro's flow guides over learning rates and particles."""
    print(f"NumPyro: KL after {MAX_STEPS} steps of svi.run, seed {seed}")
    for target, (_, model) in TARGETS.items():
        for name, make_guide in NUMPYRO_GRID_GUIDES.items():
            for lr in (1e-2, 3e-3, 1e-3):
                for num_particles in (16, 64):
                    guide = make_guide(model)
                    svi = NumPyroSVI(model, guide, numpyro.optim.Adam(lr), NumPyroTraceELBO(num_particles=num_particles))
                    params = svi.run(jax.random.PRNGKey(seed), MAX_STEPS, progress_bar=False).params
                    kl = float(NumPyroTraceELBO(num_particles=16384).loss(jax.random.PRNGKey(seed + 1), params, model, guide))
                    print(f"{target:<8} {name:<18} {lr:<6g} {num_particles:>3} {kl:.4f}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("which", nargs="?", default="all", choices=["step", "kl", "grid", "all", "kl-ours"])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds for kl (one for kl-ours)")
    parser.add_argument("--target", choices=list(TARGETS), help="kl, kl-ours: this target only")
    parser.add_argument("--compile", default="auto", choices=["auto", "background"], help="kl, kl-ours: fit's compile option")
    args = parser.parse_args(argv)
    if args.which == "kl-ours":  # one cell of the kl table, in a process of its own
        print(_seconds(*our_seconds_to_kl(TARGETS[args.target][0], int(args.seeds), args.compile)))
        return
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, jax {jax.__version__}, numpyro {numpyro.__version__}")
    if args.which in ("step", "all"):
        step_table()
    if args.which in ("kl", "all"):
        kl_table(tuple(int(seed) for seed in args.seeds.split(",")), (args.target,) if args.target else tuple(TARGETS), args.compile)
    if args.which == "grid":
        numpyro_grid()


if __name__ == "__main__":
    main()
