"""The log densities of many draws of a guide under the model, however the model is written.

Pyro's vectorised ELBO runs guide and model once under a particle plate, so the model must
broadcast over a leading dimension of every latent; the most natural regression, ``X @ w``, does
not. Three ways, tried in this order by :func:`choose`:

- ``"broadcast"``: guide and model under one particle plate (Pyro's vectorised ELBO);
- ``"vmap"``: the guide under the plate, the model's log density mapped over its draws by
  ``torch.func.vmap``, so the model sees one draw, as written;
- ``"loop"``: one particle at a time, for a model whose Python reads a latent's value.
"""

from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample

from .messages import first_line

MODES = ("broadcast", "vmap", "loop")
PARTICLE_PLATE = "num_particles_vectorized"  # as Pyro's vectorised ELBO and importance sampler name it
# sticking_the_landing="auto" uses the path-derivative gradient up to this many dimensions of a
# guide site. Measured with fit's compiled step, 64 particles (python benchmarks/bench.py stl): a step
# cost 2.2x / 2.9x / 4.4x / 15.3x the plain one at D = 2 / 10 / 20 / 50 with the flow's dense Jacobian,
# 1.6x / 2.6x / 2.3x / 4.2x since planar and IAF layers carry the score in closed form (RESULTS.md).
STICKING_THE_LANDING_MAX_DIM = 20


@dataclass(frozen=True)
class Particles:
    """``num`` draws of the guide, run as ``mode`` says, outside ``max_plate_nesting`` plates;
    ``site_shapes`` (for ``"vmap"``) are the guide's latent sites' shapes in one draw, and
    ``reason`` why the model could not broadcast, where it could not."""

    num: int
    max_plate_nesting: int
    mode: str = "broadcast"
    site_shapes: dict = None
    reason: str = ""


def choose(model, guide, num, max_plate_nesting, *args, **kwargs):
    """The first of :data:`MODES` in which ``model`` and ``guide`` run (tried on two draws)."""
    reason = ""
    for mode in MODES[:-1]:
        shapes = guide_site_shapes(guide, *args, **kwargs) if mode == "vmap" else None
        try:
            with torch.no_grad(), pyro.validation_enabled(False), poutine.block():
                log_densities(model, guide, Particles(2, max_plate_nesting, mode, shapes), *args, **kwargs)
            return Particles(num, max_plate_nesting, mode, shapes, reason)
        except Exception as failure:  # a model written for one draw fails in many ways
            reason = reason or first_line(failure)
    return Particles(num, max_plate_nesting, "loop", None, reason)


def log_densities(model, guide, particles, *args, sticking_the_landing=False, **kwargs):
    """``(log q, log p)`` of each draw of the guide, shape ``(particles.num,)``: the guide's log
    density (with the path-derivative gradient as ``sticking_the_landing`` asks, see
    :func:`~vi_flows.compiled_elbo.negative_elbo`) and the model's log joint at the draw."""
    if particles.mode == "loop":
        pairs = [_one_draw(model, guide, sticking_the_landing, *args, **kwargs) for _ in range(particles.num)]
        return torch.stack([q for q, _ in pairs]), torch.stack([p for _, p in pairs])
    with pyro.plate(PARTICLE_PLATE, particles.num, dim=-(particles.max_plate_nesting + 1)):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        if particles.mode == "broadcast":
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    log_q = _per_draw(guide_trace, particles, sticking_the_landing)
    if particles.mode == "broadcast":
        return log_q, _per_draw(model_trace, particles)
    draws = {name: guide_trace.nodes[name]["value"].reshape((particles.num,) + shape) for name, shape in particles.site_shapes.items()}
    with pyro.validation_enabled(False):  # validation branches on values, which vmap cannot
        return log_q, torch.func.vmap(lambda draw: _log_joint(model, draw, *args, **kwargs))(draws)


def _one_draw(model, guide, sticking_the_landing, *args, **kwargs):
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    one = Particles(1, 0)
    return _per_draw(guide_trace, one, sticking_the_landing)[0], _per_draw(model_trace, one)[0]


def _log_joint(model, draw, *args, **kwargs):
    return _per_draw(poutine.trace(poutine.condition(model, data=draw)).get_trace(*args, **kwargs), Particles(1, 0))[0]


def _per_draw(trace, particles, sticking_the_landing=False):
    """The sum of every sample site's log density (scaled and masked) for each draw."""
    total = 0.0
    for site in trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        fn, value = site["fn"], site["value"]
        if _uses_path_derivative(fn, sticking_the_landing):
            log_prob = fn.path_derivative_log_prob(value)
        else:
            log_prob = fn.log_prob(value, *site["args"], **site["kwargs"])
        total = total + _sum_per_draw(scale_and_mask(log_prob, site["scale"], site["mask"]), particles)
    return total * torch.ones(particles.num) if not torch.is_tensor(total) else total


def _sum_per_draw(log_prob, particles):
    dim = log_prob.dim() - particles.max_plate_nesting - 1
    if not torch.is_tensor(log_prob) or dim < 0 or log_prob.shape[dim] != particles.num:
        # Not batched over the particles (a constant factor): each draw carries its share, as in Pyro.
        return torch.as_tensor(log_prob).sum().expand(particles.num) / particles.num
    return log_prob.movedim(dim, 0).reshape(particles.num, -1).sum(-1)


def _uses_path_derivative(fn, sticking_the_landing):
    if not sticking_the_landing or not hasattr(fn, "path_derivative_log_prob"):
        return False
    return sticking_the_landing is True or fn.event_shape.numel() <= STICKING_THE_LANDING_MAX_DIM


def guide_site_shapes(guide, *args, **kwargs):
    """The shapes of one draw of each of the guide's latent sites (its auxiliary ones left out)."""
    with torch.no_grad(), poutine.block():
        trace = poutine.trace(guide).get_trace(*args, **kwargs)
    return {name: site["value"].shape for name, site in trace.iter_stochastic_nodes() if not site["infer"].get("is_auxiliary")}
