"""Data-parallel steps on this machine: items per second and peak memory per rank with 1 and 2
processes (``torchrun``, gloo), on issue 19's hierarchical model at N groups subsampled to B = 256
per rank, the per-item guide, one particle, the step as ``fit`` takes it, eager and compiled; and
the seconds of a refresh between runs of steps (every item's rows refitted, the control variate's
slopes taken), which the ranks split.

    python benchmarks/data_parallel.py [N] [steps] [layouts]   # default 100000 groups, 500 timed steps,
                                                                # layouts one,shared,own

Each configuration runs in its own processes; "one" is the plain single-process step (no process
group), "shared" two ranks holding every group, each stepping on its own half and all-reducing the
gradient, "own" two ranks each holding only its half (``data_parallel="own-data"``; the halves
drawn with the rank as the seed, as a rank would load its shard of a dataset).
"""

import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import pyro
import torch
import torch.distributed as dist

from local_scale import SUBSAMPLE, make_model
from vi_flows import AutoFlow
from vi_flows.elbo_step import ELBOStep
from vi_flows.pyro_internals import max_plate_nesting

WARMUP_STEPS = 50


def one_rank(num_groups, steps, compile, layout, folder):
    torch.set_num_threads(1)
    parallel = "WORLD_SIZE" in os.environ
    pyro.set_rng_seed(0)
    if layout == "own":
        model = make_model(num_groups // int(os.environ["WORLD_SIZE"]), seed=int(os.environ["RANK"]))
    else:
        model = make_model(num_groups)
    guide = AutoFlow(model, local="per-item")
    nesting = max_plate_nesting(model, guide)
    if parallel:
        dist.init_process_group("gloo")
    data_parallel = "own-data" if layout == "own" else parallel
    step = ELBOStep(model, guide, num_particles=1, max_plate_nesting=nesting, threads=1, compile=compile, data_parallel=data_parallel)
    if parallel:
        pyro.set_rng_seed(dist.get_rank())
    world = dist.get_world_size() if parallel else 1
    for _ in range(WARMUP_STEPS):
        step(1e-3)
    start = time.perf_counter()
    for _ in range(steps):
        step(1e-3)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    step.refresh()
    refresh_seconds = time.perf_counter() - start
    row = {"refresh_s": refresh_seconds, "compiled": step.compiled, "ranks": world, "rank": dist.get_rank() if parallel else 0, "ms_per_step": 1e3 * seconds / steps,
           "items_per_second": world * SUBSAMPLE * steps / seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    with open(os.path.join(folder, f"rank{row['rank']}.json"), "w") as file:  # ranks share stdout
        json.dump(row, file)
    if parallel:
        dist.barrier()  # gloo aborts a rank that leaves while a peer still talks to it
        dist.destroy_process_group()


def main(num_groups=100_000, steps=500, layouts="one,shared,own"):
    here = os.path.abspath(__file__)
    ranks = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    launches = {"one": [sys.executable], "shared": ranks, "own": ranks}
    for compile, layout in itertools.product(("eager", "compiled"), layouts.split(",")):
        with tempfile.TemporaryDirectory() as folder:
            subprocess.run([*launches[layout], here, "_rank", str(num_groups), str(steps), compile, layout, folder], capture_output=True, check=True)
            for name in sorted(os.listdir(folder)):
                with open(os.path.join(folder, name)) as file:
                    row = json.load(file)
                print(f"N={num_groups}, {compile}, {layout}: {row['ranks']} rank(s), rank {row['rank']}: {row['ms_per_step']:.2f} ms/step, "
                      f"{row['items_per_second']:.0f} items/s, peak {row['peak_mb']:.0f} MB, refresh {row['refresh_s']:.2f} s", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_rank"]:
        one_rank(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "compiled", sys.argv[5], sys.argv[6])
    else:
        main(*(int(value) for value in sys.argv[1:3]), *sys.argv[3:4])
