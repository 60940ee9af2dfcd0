"""One rank of a data-parallel step or fit, run by ``tests/test_data_parallel.py`` under torchrun:
``python -m torch.distributed.run --standalone --nproc-per-node 2 data_parallel_worker.py MODE OUT``."""

import os
import sys

import pyro
import torch
import torch.distributed as dist

from test_local import fixed_tau_model, grouped_data
from vi_flows import AutoFlow, fit, sample_constrained
from vi_flows.elbo_step import ELBOStep

GRADIENT_ITEMS, GRADIENT_SUBSAMPLE = 40, 5
FIT_ITEMS, FIT_SUBSAMPLE = 1000, 50
REFRESH_ITEMS = 41  # two ranks' shares of 21 and 20 items
ROW_OFFSET = 1.0  # in loc and log precision: the refit moves the rows back


def gradient_step(data_parallel=False):
    """The per-item guide's step at its start, built as a single process builds it (seed 0)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoFlow(fixed_tau_model, flow="planar", local="per-item")
    data = grouped_data(GRADIENT_ITEMS)
    return ELBOStep(fixed_tau_model, guide, data, GRADIENT_SUBSAMPLE, num_particles=4, max_plate_nesting=2, threads=1, data_parallel=data_parallel)


def refreshed_step(data_parallel=False):
    """The per-item guide's step with its rows moved ``ROW_OFFSET`` off their start, then refreshed:
    every item's rows refitted, the control variate anchored; and the rows before the refresh."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoFlow(fixed_tau_model, flow="planar", local="per-item")
    data = grouped_data(REFRESH_ITEMS)
    step = ELBOStep(fixed_tau_model, guide, data, GRADIENT_SUBSAMPLE, num_particles=4, max_plate_nesting=2, threads=1, data_parallel=data_parallel)
    with torch.no_grad():
        for table in step.tables:
            table.add_(ROW_OFFSET)
    before = [table.detach().clone() for table in step.tables]
    step.refresh()
    return step, before


def refreshed(out):
    dist.init_process_group("gloo")
    step, _ = refreshed_step(data_parallel=True)
    saved = {"tables": [table.detach() for table in step.tables], "slopes": step.control_variate.slopes, "total": step.control_variate.total}
    torch.save(saved, f"{out}.{dist.get_rank()}")
    dist.barrier()
    dist.destroy_process_group()


def averaged_gradient(out):
    dist.init_process_group("gloo")
    step = gradient_step(data_parallel=True)
    pyro.set_rng_seed(dist.get_rank())
    loss = step.loss()
    loss.backward()
    _, gradients = step.parallel.average(loss.detach(), [param.grad for param in step.params])
    shared = [gradient for gradient, is_table in zip(gradients, step.parallel.is_table) if not is_table]
    torch.save(shared, f"{out}.{dist.get_rank()}")
    dist.barrier()  # gloo aborts a rank that leaves while a peer still talks to it
    dist.destroy_process_group()


def fitted_moments(out):
    """A data-parallel fit of the subsampled hierarchy (fit starts and ends the process group)."""
    data = grouped_data(FIT_ITEMS)
    guide = AutoFlow(fixed_tau_model, flow="planar", local="per-item")
    result = fit(fixed_tau_model, guide, data, FIT_SUBSAMPLE, num_particles=16, seed=0, progress=False, num_steps=3000, lr=0.05, final_lr_fraction=0.001)
    draws = sample_constrained(guide, 4000, data, FIT_SUBSAMPLE)
    moments = {name: (value.double().mean(0), value.double().std(0)) for name, value in draws.items()}
    saved = {"moments": moments, "losses": result.losses, "state": guide.state_dict(), "compiled": result.compiled, "compile_failure": result.compile_failure}
    torch.save(saved, f"{out}.{os.environ['RANK']}")


if __name__ == "__main__":
    mode, out = sys.argv[1:3]
    torch.set_num_threads(1)
    {"gradient": averaged_gradient, "refresh": refreshed, "fit": fitted_moments}[mode](out)
