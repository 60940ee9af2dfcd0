"""What building ``fit``'s compiled step costs: ``python benchmarks/compile_cost.py [MODEL] [--flow SPEC]``.

For a zoo model (default the 10-D funnel) and ``AutoFlow``'s flow (default the default flow), 64
particles, one thread, ``fit``'s default path derivative: the traced step's size in ATen operations,
the seconds ``ELBOStep(compile=True)`` takes with an empty Inductor cache (``TORCHINDUCTOR_CACHE_DIR``
a new directory) and then with that cache, each in a fresh process (a process keeps compiled code in
memory), and the milliseconds per compiled step (2000 steps after 50).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

PARTICLES, THREADS, WARM_UP_STEPS, TIMED_STEPS = 64, 1, 50, 2000


def _one_build(model_name, flow):
    """Build the step in this process; its size, build seconds and ms per step, as a JSON line."""
    import pyro

    import vi_flows.compiled_step as compiled_step
    from vi_flows import AutoFlow
    from vi_flows.elbo_step import ELBOStep
    from vi_flows.pyro_internals import max_plate_nesting
    from vi_flows.threads import intra_op_threads
    from vi_flows.zoo import load_model

    sizes = []
    compilation = compiled_step.Compilation

    def counting(graphs, *args, **kwargs):  # the step's graphs as Inductor receives them
        sizes.extend(sum(node.op == "call_function" for node in graph.graph.nodes) for graph, _ in graphs)
        return compilation(graphs, *args, **kwargs)

    compiled_step.Compilation = counting
    pyro.set_rng_seed(0)
    model = load_model(model_name).model
    guide = AutoFlow(model, flow=flow) if flow else AutoFlow(model)
    nesting = max_plate_nesting(model, guide)
    start = time.perf_counter()
    step = ELBOStep(model, guide, num_particles=PARTICLES, max_plate_nesting=nesting, compile=True, threads=THREADS)
    build = time.perf_counter() - start
    with intra_op_threads(step.num_threads):  # as fit steps
        for _ in range(WARM_UP_STEPS):
            step(1e-3)
        start = time.perf_counter()
        for _ in range(TIMED_STEPS):
            step(1e-3)
    milliseconds = (time.perf_counter() - start) / TIMED_STEPS * 1e3
    print(json.dumps({"operations": sum(sizes), "build_seconds": build, "ms_per_step": milliseconds}))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/compile_cost.py", description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default="funnel")
    parser.add_argument("--flow", help="a flow spec (default: AutoFlow's default flow)")
    parser.add_argument("--one-build", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_build:
        _one_build(args.model, args.flow)
        return
    command = [sys.executable, __file__, args.model, "--one-build"] + (["--flow", args.flow] if args.flow else [])
    with tempfile.TemporaryDirectory() as cache:
        environment = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for run in ("cold", "warm"):
            output = subprocess.run(command, env=environment, capture_output=True, text=True, check=True).stdout
            cell = json.loads(output.strip().splitlines()[-1])
            print(f"{args.model} {args.flow or 'default flow'} {run}: {cell['operations']} operations, "
                  f"build {cell['build_seconds']:.1f} s, {cell['ms_per_step']:.3f} ms per step", flush=True)


if __name__ == "__main__":
    main()
