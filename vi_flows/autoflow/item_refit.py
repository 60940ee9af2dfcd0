r"""Each item's pseudo-observation moved to the ELBO's optimum given the globals' posterior, every
item a subsample at a time: what a subsampled fit's steps cannot do for an item they visit a few times.

A step of B of N items moves an item's row (:mod:`~vi_flows.item_steps`) only in the steps that visit
it, N / B times fewer than the globals, and by about the learning rate each time. Where the
likelihood is not Gaussian in the item's coordinates the start (:mod:`~vi_flows.autoflow.local_initialization`,
a Laplace approximation at the globals' start) is not the optimum, and the globals read every row's
error: 20,000 Poisson groups in subsamples of 64 ended a posterior sd from the full batch's fit, and
within 0.01 sd when started from the full batch's rows (RESULTS.md, "A hierarchy that is not conjugate").

For an item with coordinates :math:`z` (unconstrained), Gaussian prior :math:`p_\theta` and likelihood
:math:`\ell`, its posterior given a draw :math:`\theta` of the globals is :math:`q_\theta \propto p_\theta(z)
\exp(\lambda_1 z + \lambda_2 z^2)`, per coordinate, with :math:`\lambda = (\beta a, -\beta/2)`. The ELBO's
gradient in :math:`\lambda` is :math:`E_\theta[F_\theta (c_\theta - \lambda)]`, where :math:`F_\theta` is the
Fisher matrix of :math:`q_\theta`'s natural parameters (the covariance of :math:`(z, z^2)`) and
:math:`c_\theta = (E[\ell'] - \mu E[\ell''],\ E[\ell'']/2)` under :math:`q_\theta` (Bonnet's and Price's
theorems), so the optimum is the fixed point

.. math:: \lambda = \Big(\sum_\theta F_\theta\Big)^{-1} \sum_\theta F_\theta\, c_\theta,

iterated from the current rows: with one :math:`\theta` it is conjugate-computation VI's step of size
one (Khan & Lin, AISTATS 2017), exact in one iteration for a Gaussian likelihood. The expectations over
:math:`q_\theta` are a quadrature per item (2d + 1 points, exact for polynomials of degree 3 in each of
its d coordinates, so a conjugate item's rows do not move and take no noise), over a fixed set of the
globals' draws. In a data-parallel fit each rank refits the items it owns and the ranks exchange
the rows (:class:`~vi_flows.data_parallel.Shard`). It applies to per-item tables without a local
flow, every local prior Gaussian in unconstrained space and following the globals alone (a local
site whose prior reads another local site is left to the steps).
"""

import math
from dataclasses import dataclass
from operator import attrgetter

import torch
from pyro import poutine
from torch.distributions import biject_to

from .local import LocalSampler
from .local_gaussian import gaussian_prior, item_gaussian
from .local_initialization import MIN_PRECISION_SHARE, constrained_values, draws_plate, fixed_subsamples, item_coordinate_probes, local_derivatives, write_rows
from .pseudo_observations import PerItem

# The globals' draws each item's optimum is averaged over (the same draws, from a fixed seed, for
# every item and on every rank).
GLOBAL_DRAWS = 8
MAX_ITERATIONS = 10
# Iterations stop once no row moves more than this, in its item's posterior sds (loc) or in log precision.
TOLERANCE = 1e-3


@dataclass
class Refit:
    """What :func:`refit_items` did: how far the rows moved, the largest and the mean over the items'
    coordinates, in the item's posterior sds (``loc``) and in log precision."""

    largest_loc: float = 0.0
    mean_loc: float = 0.0
    largest_log_precision: float = 0.0
    mean_log_precision: float = 0.0


def refittable(guide):
    """Why ``guide``'s local posteriors cannot be refitted here ("" where they can)."""
    posterior = getattr(guide, "locals", None)
    if posterior is None:
        return "the guide has no local posteriors"
    if not isinstance(posterior.pseudo_observations, PerItem) or posterior.flow_spec is not None:
        return "its items' posteriors are amortised or carry a local flow"
    if posterior.mean_field:
        return f"the priors of {posterior.mean_field} are not Gaussian in unconstrained space"
    return ""


@torch.no_grad()
def refit_items(guide, *args, global_draws=GLOBAL_DRAWS, shard=None, **kwargs):
    """Move every item's rows of a set-up ``AutoFlow``'s per-item tables to their optimum given
    ``global_draws`` of its globals (see the module's docstring); a :class:`Refit`, or None where the
    local posteriors cannot be refitted (:func:`refittable`, or a local prior reading another local
    site). Its draws come from a fixed seed, the caller's random state left as it was. With a
    ``shard`` (:class:`~vi_flows.data_parallel.Shard`, every rank calling) this rank refits its own
    items of the subsampled plate and receives the other ranks' rows."""
    if refittable(guide):
        return None
    shard = shard if guide.locals.subsampled else None  # every rank steps every item of an unsubsampled plate
    with torch.random.fork_rng():
        torch.manual_seed(0)
        moves = _refit_every_item(guide, global_draws, shard, args, kwargs)
    if moves is None:
        return None
    loc, log_precision = (torch.cat(parts) for parts in zip(*moves))
    if shard is None:
        return Refit(loc.max().item(), loc.mean().item(), log_precision.max().item(), log_precision.mean().item())
    _share_rows(guide.locals, shard)
    largest = shard.max(torch.stack([loc.max(), log_precision.max()]))
    totals = shard.sum(torch.stack([loc.sum(), log_precision.sum(), loc.new_tensor(len(loc))]))
    return Refit(largest[0].item(), (totals[0] / totals[2]).item(), largest[1].item(), (totals[1] / totals[2]).item())


def _share_rows(posterior, shard):
    """Give every rank the rows each rank refitted of its own items."""
    ((plate, frame),) = posterior.subsampled.items()
    size = frame.full_size
    for name in posterior.names:
        loc, log_precision = _rows(posterior, name, {plate: shard.items(size)})
        dim = loc.dim() + frame.dim - posterior.event_dims[name]
        for (items, their_loc), (_, their_log_precision) in zip(shard.gather(loc, dim, size), shard.gather(log_precision, dim, size)):
            write_rows(posterior, name, {plate: items}, their_loc, their_log_precision.exp())


def _refit_every_item(guide, global_draws, shard, args, kwargs):
    """:func:`_refit_subsample`'s moves over every subsample (of ``shard``'s items, where given), or None."""
    posterior, global_values, num_draws = guide.locals, {}, 1
    if guide.latent_dim:
        values, _ = constrained_values(guide, guide.get_posterior().sample((global_draws,)))
        global_values = {name: posterior.left_of_plates(name, value) for name, value in values.items()}
        num_draws = global_draws
    subsamples = fixed_subsamples(posterior, None, shard)
    dim = _item_dimension(posterior, global_values, num_draws, subsamples[0], args, kwargs)
    moves = []
    for indices in subsamples:
        moved = _refit_subsample(posterior, global_values, num_draws, dim, indices, args, kwargs)
        if moved is None:
            return None
        moves.append(moved)
    return moves


def _refit_subsample(posterior, global_values, num_draws, dim, indices, args, kwargs):
    """Iterate the fixed point for the items of one model run (the subsample ``indices``, or all);
    per coordinate, how far the rows moved (loc in item sds, log precision), or None where a local
    prior reads another local site."""
    points = _Points(posterior, global_values, num_draws, dim, indices, args, kwargs)
    rows = {name: _rows(posterior, name, points.indices) for name in posterior.names}  # (a, log beta)
    start, step, last = dict(rows), 1.0, math.inf
    for _ in range(MAX_ITERATIONS):
        values = {name: points.values(name, *rows[name]) for name in posterior.names}
        gradient, curvature, trace = local_derivatives(posterior, points.globals, values, points.probes, points.indices, *args, num_draws=points.size, **kwargs)
        if any(tensor.requires_grad for name in posterior.names for tensor in gaussian_prior(trace.nodes[name]["fn"])):
            return None  # a chain of local sites: one's posterior follows another's draw
        moved = 0.0
        for name in posterior.names:
            target = _fixed_point(points, name, rows[name], values[name], gradient[name], curvature[name])
            new = tuple(old + step * (value - old) for old, value in zip(rows[name], target))
            moved = max(moved, *(move.max().item() for move in _moves(points, name, rows[name], new)))
            rows[name] = new
        if moved < TOLERANCE:
            break
        step, last = (step / 2 if moved > last else step), moved  # damped where it oscillates
    for name in posterior.names:
        write_rows(posterior, name, points.indices, rows[name][0], rows[name][1].exp())
    moves = [_moves(points, name, start[name], rows[name]) for name in posterior.names]
    return torch.cat([loc.flatten() for loc, _ in moves]), torch.cat([log_precision.flatten() for _, log_precision in moves])


def _item_dimension(posterior, global_values, num_draws, indices, args, kwargs):
    """How many coordinates an item has, over every local site."""
    run = _run(posterior, global_values, num_draws, indices, args, kwargs)
    return sum(len(item_coordinate_probes(run.nodes[name], _unconstrained(posterior, run, name))) for name in posterior.names)


class _Points:
    """The model run at ``num_draws`` draws of the globals, each repeated at the quadrature's 2d + 1
    points of the items' ``dim`` = d coordinates (the centre, then plus and minus ``sqrt(d + kappa)``
    item sds along each coordinate in turn): the draws' ``globals``, the run's subsample ``indices``,
    each local site's ``priors`` and coordinate ``probes``
    (:func:`~vi_flows.autoflow.local_initialization.item_coordinate_probes`)."""

    def __init__(self, posterior, global_values, num_draws, dim, indices, args, kwargs):
        kappa = max(3 - dim, 0)  # exact for degree 3, and for degree 5 along each coordinate where d <= 3
        self.weights = torch.tensor([kappa / (dim + kappa)] + [0.5 / (dim + kappa)] * (2 * dim), dtype=torch.float64)
        self.num_draws, self.num_points = num_draws, 2 * dim + 1
        self.size = num_draws * self.num_points
        self.globals = {name: value.repeat_interleave(self.num_points, 0) for name, value in global_values.items()}
        run = _run(posterior, self.globals, self.size, indices, args, kwargs)
        self.indices = {plate: run.nodes[plate]["value"] for plate in posterior.subsampled}
        self.priors, self.probes, self._offsets, coordinate = {}, {}, {}, 0
        for name in posterior.names:
            value = _unconstrained(posterior, run, name)
            self.priors[name], self.probes[name] = run.nodes[name]["fn"], item_coordinate_probes(run.nodes[name], value)
            offset = self._by_point(torch.zeros_like(value))
            for probe in self.probes[name]:
                for point, sign in ((1 + 2 * coordinate, 1.0), (2 + 2 * coordinate, -1.0)):
                    offset[:, point] += sign * math.sqrt(dim + kappa) * self._by_point(probe)[:, point]
                coordinate += 1
            self._offsets[name] = offset.reshape(value.shape)

    def _by_point(self, tensor):
        """``(draws, points, ...)``: a tensor whose first dimension runs over draws and points."""
        return tensor.reshape((self.num_draws, self.num_points) + tensor.shape[1:])

    def values(self, name, loc, log_precision):
        """The quadrature's points of each item's posterior at each draw of the globals."""
        item_loc, item_scale = item_gaussian(self.priors[name], loc, log_precision.exp())
        return item_loc + item_scale * self._offsets[name]

    def expectation(self, tensor):
        """``(draws, ...)``: the quadrature's expectation of ``tensor`` (one value per point) at each draw."""
        return torch.tensordot(self.weights.to(tensor), self._by_point(tensor), dims=([0], [1]))

    def at_centre(self, tensor):
        return self._by_point(tensor)[:, 0]


def _fixed_point(points, name, rows, values, gradient, curvature):
    """The fixed point's ``(a, log beta)`` of each item of one site from the log joint's slope and
    curvature at the quadrature's points (see the module's docstring); an item whose likelihood
    curves upwards there keeps its rows (the steps move it)."""
    prior = points.priors[name]
    prior_loc, prior_scale = gaussian_prior(prior)
    prior_precision = prior_scale.pow(-2)
    loc, log_precision = rows
    slope = points.expectation((gradient + prior_precision * (values - prior_loc)).double())  # E[l']
    bend = points.expectation((curvature + prior_precision).double())  # E[l'']
    item_loc, item_scale = (points.at_centre(tensor).double() for tensor in item_gaussian(prior, loc, log_precision.exp()))
    reference = item_loc.mean(0)  # the natural parameters about it: a well-conditioned Fisher matrix
    shift, variance = item_loc - reference, item_scale.pow(2)
    f11, f12, f22 = variance, 2 * shift * variance, 4 * shift.pow(2) * variance + 2 * variance.pow(2)
    c1, c2 = slope - shift * bend, bend / 2
    a11, a12, a22 = f11.sum(0), f12.sum(0), f22.sum(0)
    b1, b2 = (f11 * c1 + f12 * c2).sum(0), (f12 * c1 + f22 * c2).sum(0)
    determinant = a11 * a22 - a12.pow(2)
    first, second = (a22 * b1 - a12 * b2) / determinant, (a11 * b2 - a12 * b1) / determinant
    precision = -2 * second
    floor = MIN_PRECISION_SHARE * points.at_centre(prior_precision).double().mean(0).clamp(min=1.0)
    kept = ~(precision > floor)
    new_loc = torch.where(kept, _as_rows(loc, reference).double(), reference + first / precision)
    new_log_precision = torch.where(kept, _as_rows(log_precision, reference).double(), precision.clamp(min=floor).log())
    return _as_rows(new_loc, loc).to(loc), _as_rows(new_log_precision, loc).to(loc)


def _moves(points, name, old, new):
    """How far each item's rows moved from ``old`` to ``new``: its posterior mean, in its posterior
    sds (averaged over the draws), and its log precision."""
    _, item_scale = item_gaussian(points.priors[name], new[0], new[1].exp())
    scale = _as_rows(points.at_centre(item_scale).mean(0), new[0])
    return scale * new[1].exp() * (new[0] - old[0]).abs(), (new[1] - old[1]).abs()


def _as_rows(tensor, rows):
    """``tensor`` (an item's quantity, with leading dimensions of size one) shaped as ``rows``."""
    return tensor.reshape(rows.shape)


def _rows(posterior, name, indices):
    """``(a, log beta)``: the rows of the site's tables for the subsample ``indices`` (all rows without)."""
    tables = posterior.pseudo_observations
    rows = []
    for table in (attrgetter(name)(tables.locs), attrgetter(name)(tables.log_precisions)):
        if not indices:
            rows.append(table.detach().clone())
            continue
        ((plate, index),) = indices.items()
        rows.append(table.detach().index_select(table.dim() + posterior.subsampled[plate].dim - posterior.event_dims[name], index.to(table.device)))
    return tuple(rows)


def _run(posterior, global_values, num_draws, indices, args, kwargs):
    """A trace of the model under ``num_draws`` draws of the globals, the locals from their priors."""
    with poutine.block(), draws_plate(posterior, num_draws), poutine.trace() as run:
        with LocalSampler(None, global_values, {}, indices):
            posterior.model(*args, **kwargs)
    return run.trace


def _unconstrained(posterior, trace, name):
    return biject_to(posterior.supports[name]).inv(trace.nodes[name]["value"])
