"""A flow per item of a local site (:mod:`~vi_flows.autoflow.local`): any registered flow as a
:class:`~vi_flows.flows.conditional.ConditionalFlow` on the item's coordinates, conditioned on a
context per item (a learned row, or the encoder's hidden layer)."""

from torch.distributions import biject_to
from torch.distributions.transforms import ReshapeTransform

from ..flows.conditional import ConditionalFlow
from ..registry import build_flow

# A per-item flow's context: a learned row per item, this wide (its parameters vary in a space this big).
PER_ITEM_CONTEXT = 8


def item_flow(site, spec, options, context_dim):
    """The flow ``spec`` (built with ``options``) on one item's coordinates of ``site``, conditioned
    on a context ``context_dim`` wide."""
    dim = max(_event_shape(site).numel(), 1)
    return ConditionalFlow(build_flow(spec, dim, **(options or {})), dim, context_dim)


def on_item_vectors(flow, event_shape):
    """``flow`` (on each item's vector) between reshapes from and to the site's event shape."""
    if len(event_shape) == 1:
        return [flow]
    dim = (max(event_shape.numel(), 1),)
    return [ReshapeTransform(event_shape, dim, cache_size=1), flow, ReshapeTransform(dim, event_shape, cache_size=1)]


def _event_shape(site):
    """A site's event shape in unconstrained space."""
    to_support = biject_to(site["fn"].support)
    return to_support.inverse_shape(site["fn"].event_shape)


def check_items_are_events(trace, names, per_item_shapes):
    """A clear error where an amortised site's item is not its event: a flow reads one item's vector."""
    for name in names:
        if per_item_shapes[name] != _event_shape(trace.nodes[name]):
            raise ValueError(
                f"local site {name!r} has batch dimensions right of its amortised plate (its per-item shape "
                f"{tuple(per_item_shapes[name])} is not its event shape), so a local flow cannot read one item's "
                "coordinates; declare them with .to_event(...), or use local='per-item'."
            )
