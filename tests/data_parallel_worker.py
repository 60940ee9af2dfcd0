"""One rank of a data-parallel step or fit, run by ``tests/test_data_parallel.py`` under torchrun:
``python -m torch.distributed.run --standalone --nproc-per-node 2 data_parallel_worker.py MODE OUT``."""

import os
import sys

import pyro
import torch
import pyro.distributions as dist
import torch.distributed as distributed

from test_local import fixed_tau_model, grouped_data
from vi_flows import AutoFlow, fit, sample_constrained
from vi_flows.elbo_step import ELBOStep

GRADIENT_ITEMS, GRADIENT_SUBSAMPLE = 40, 5
FIT_ITEMS, FIT_SUBSAMPLE = 1000, 50
REGRESSION_ITEMS = 40
REGRESSION_SUBSAMPLES = ([3, 0, 17, 9], [5, 12, 1, 19])  # each rank's, of its own 20 items
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
    distributed.init_process_group("gloo")
    step, _ = refreshed_step(data_parallel=True)
    saved = {"tables": [table.detach() for table in step.tables], "slopes": step.control_variate.slopes, "total": step.control_variate.total}
    torch.save(saved, f"{out}.{distributed.get_rank()}")
    distributed.barrier()
    distributed.destroy_process_group()


def averaged_gradient(out):
    distributed.init_process_group("gloo")
    step = gradient_step(data_parallel=True)
    pyro.set_rng_seed(distributed.get_rank())
    loss = step.loss()
    loss.backward()
    _, gradients = step.parallel.average(loss.detach(), [param.grad for param in step.params])
    shared = [gradient for gradient, is_table in zip(gradients, step.parallel.is_table) if not is_table]
    torch.save(shared, f"{out}.{distributed.get_rank()}")
    distributed.barrier()  # gloo aborts a rank that leaves while a peer still talks to it
    distributed.destroy_process_group()


def regression(x, y, subsample=None):
    """Coefficients of a regression whose data plate reads the ``subsample`` given."""
    weights = pyro.sample("weights", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    with pyro.plate("data", len(y), subsample=subsample) as index:
        pyro.sample("y", dist.Normal((x[index] * weights).sum(-1), 1.0), obs=y[index])


def regression_data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(REGRESSION_ITEMS, 3, generator=generator)
    return x, x @ torch.tensor([1.0, -2.0, 0.5]) + torch.randn(REGRESSION_ITEMS, generator=generator)


def regression_step(x, y, subsample, data_parallel=False, start=None):
    """A planar guide's step on the regression, from ``start`` (its state) where given; the random
    state then seeded, so that every such step draws the same globals."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoFlow(regression, flow="planar")
    guide(x, y, subsample)
    if start is not None:
        guide.load_state_dict(start)
    step = ELBOStep(regression, guide, x, y, subsample, num_particles=4, max_plate_nesting=1, threads=1, data_parallel=data_parallel)
    pyro.set_rng_seed(0)
    return step, guide


def own_data_gradient(out):
    """Each rank holds its own half of the regression's data and steps on the subsample
    ``REGRESSION_SUBSAMPLES[rank]`` of it, at the same draws of the globals."""
    distributed.init_process_group("gloo")
    rank = distributed.get_rank()
    x, y = (tensor[rank::2] for tensor in regression_data())
    step, guide = regression_step(x, y, torch.tensor(REGRESSION_SUBSAMPLES[rank]), data_parallel="own-data")
    start = guide.state_dict()  # rank 0's, set up on its half of the data
    loss = step.loss()
    loss.backward()
    loss, gradients = step.parallel.average(loss.detach(), [param.grad for param in step.params])
    torch.save((start, loss, gradients), f"{out}.{rank}")
    distributed.barrier()
    distributed.destroy_process_group()


def own_data_fit(out):
    """A data-parallel fit of the subsampled hierarchy, each rank holding its own half of the groups."""
    rank = int(os.environ["RANK"])
    fitted_moments(out, grouped_data(FIT_ITEMS)[rank::2], "own-data")


def fitted_moments(out, data=None, data_parallel="auto"):
    """A data-parallel fit of the subsampled hierarchy (fit starts and ends the process group)."""
    data = grouped_data(FIT_ITEMS) if data is None else data
    guide = AutoFlow(fixed_tau_model, flow="planar", local="per-item")
    result = fit(
        fixed_tau_model, guide, data, FIT_SUBSAMPLE, num_particles=16, seed=0, progress=False, num_steps=3000, lr=0.05, final_lr_fraction=0.001, data_parallel=data_parallel
    )
    draws = sample_constrained(guide, 4000, data, FIT_SUBSAMPLE)
    moments = {name: (value.double().mean(0), value.double().std(0)) for name, value in draws.items()}
    saved = {"moments": moments, "losses": result.losses, "state": guide.state_dict(), "compiled": result.compiled, "compile_failure": result.compile_failure,
             "checks": (result.subsample_noise, result.item_shift)}
    torch.save(saved, f"{out}.{os.environ['RANK']}")


if __name__ == "__main__":
    mode, out = sys.argv[1:3]
    torch.set_num_threads(1)
    modes = {"gradient": averaged_gradient, "refresh": refreshed, "fit": fitted_moments, "own-data-gradient": own_data_gradient, "own-data-fit": own_data_fit}
    modes[mode](out)
