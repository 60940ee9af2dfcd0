r"""Conditional flows: any registered flow with its parameters a function of a context, one set per item.

An amortised posterior needs a flow per data point: the Sylvester flows' encoder emits
:math:`Q, R, \tilde R, b` for every item (van den Berg et al. 2018), an IAF's MADE reads the
item's context (Kingma et al. 2016). :class:`ConditionalFlow` does this for every registered family
at once: the family's parameters (or the ones it names in ``conditioned``) become

.. math:: \theta(c) = \theta_0 + W c,

with :math:`\theta_0` the unconditional flow's parameters and :math:`W` a learned linear map of the
context, zero at the start, so that the flow starts as the unconditional one (near the identity).
The family's own forward pass, log-determinant and inverse then run once per item with that item's
parameters (``torch.func.vmap``): a conditional flow is exact wherever its family is.
"""

import math

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch import nn
from torch.distributions import Transform, constraints

from .base import forward_and_log_det, inverse


class ConditionalFlow(ConditionalTransformModule):
    """``flow`` (a registered flow, or a spec's composition of them, on R^``dim``) whose parameters
    follow a ``context_dim``-dimensional context; ``condition(context)`` with a context of shape
    ``(*items, context_dim)`` gives the transform of items ``*items`` (events ``(*items, dim)``,
    any dimensions to the left, such as particles, shared)."""

    def __init__(self, flow, dim, context_dim):
        super().__init__()
        self.flow, self.dim, self.context_dim = flow, int(dim), int(context_dim)
        self.conditioned = conditioned_parameters(flow)
        sizes = [math.prod(param.shape) for param in self.conditioned.values()]
        self.hypernet = nn.Linear(self.context_dim, sum(sizes), bias=False)
        nn.init.zeros_(self.hypernet.weight)
        self._sizes = sizes

    def item_parameters(self, context):
        """``{name: (items, *shape)}``: each conditioned parameter for every item of ``context``
        (``(*items, context_dim)``, flattened to one items dimension)."""
        context = context.reshape(-1, self.context_dim)
        offsets = self.hypernet(context).split(self._sizes, dim=-1)
        return {
            name: param + offset.reshape((len(context),) + param.shape)
            for (name, param), offset in zip(self.conditioned.items(), offsets)
        }

    def condition(self, context):
        return ConditionedFlow(self, self.item_parameters(context), context.shape[:-1])


class ConditionedFlow(Transform):
    """A :class:`ConditionalFlow` given the contexts of a batch of items: a bijection of each item's
    R^dim, the items' transforms differing by their parameters."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, conditional, parameters, item_shape):
        super().__init__(cache_size=1)
        self.conditional, self.parameters, self.item_shape = conditional, parameters, torch.Size(item_shape)
        self._last_output_and_log_det = None

    def _per_item(self, function, x):
        """``function(flow, x_i)`` for every item ``i``, the flow holding item ``i``'s parameters;
        ``x`` is ``(..., *items, dim)``. Returns the outputs with ``x``'s leading shape."""
        dim = self.conditional.dim
        x = x.expand(torch.broadcast_shapes(x.shape, self.item_shape + (dim,)))
        leading = x.shape[: x.dim() - len(self.item_shape) - 1]
        items = x.reshape(leading + (-1, dim)).movedim(-2, 0)
        flow = self.conditional.flow

        def one_item(parameters, point):
            return torch.func.functional_call(_Apply(flow, function), parameters, (point,), strict=False)

        names = {name: "flow." + name for name in self.parameters}
        outputs = torch.func.vmap(one_item)({names[k]: v for k, v in self.parameters.items()}, items)
        return tuple(out.movedim(0, len(leading)).reshape(leading + self.item_shape + out.shape[len(leading) + 1 :]) for out in outputs)

    def _call(self, x):
        y, log_det = self._per_item(lambda flow, point: forward_and_log_det(flow, point), x)
        self._last_output_and_log_det = (y, log_det)
        return y

    def _inverse(self, y):
        (x,) = self._per_item(lambda flow, point: (inverse(flow, point),), y)
        return x

    def log_abs_det_jacobian(self, x, y):
        last = self._last_output_and_log_det
        if last is not None and last[0] is y:
            return last[1]
        return self._per_item(lambda flow, point: forward_and_log_det(flow, point), x)[1]


class _Apply(nn.Module):
    """``function(flow, x)`` as a module's forward pass, so that ``functional_call`` can swap the
    flow's parameters for one item's."""

    def __init__(self, flow, function):
        super().__init__()
        self.flow, self.function = flow, function

    def forward(self, x):
        return self.function(self.flow, x)


def conditioned_parameters(flow):
    """``{name: parameter}`` of the flow's parameters that follow the context: every parameter of a
    family, or those a family names in its ``conditioned`` attribute (an IAF's hidden layer's bias,
    so that the context enters its MADE as in Kingma et al. 2016)."""
    chosen = {}
    for prefix, module in flow.named_modules():
        own = dict(module.named_parameters(recurse=False))
        for name in getattr(module, "conditioned", own):
            chosen[f"{prefix}.{name}" if prefix else name] = own[name]
    return chosen
