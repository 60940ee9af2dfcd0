r"""Where the local posteriors' pseudo-observations :math:`(a_i, \beta_i)` come from
(:mod:`~vi_flows.autoflow.local`): a table per item, or a network of each item's data.

- :class:`PerItem`: full-size tables with Pyro's ``event_dim``, so that a subsampled plate reads
  the rows of its subsample; two parameters per coordinate and item.
- :class:`Amortized`: one small network per local site maps an item's features (by default the
  values of the observed sites in the item's plate, standardised) to its pseudo-observation, so the
  parameters do not grow with the items and an item never seen in fitting still gets a posterior
  (Kingma & Welling 2014; the Sylvester flows' own setting, van den Berg et al. 2018).

Both keep :math:`\beta` positive through ``exp``, so that an optimiser step moves it by a factor, not
by a fixed amount; where they start is :mod:`~vi_flows.autoflow.local_initialization`'s. The per-item
tables hold :math:`\log \beta` unconstrained and take the ``exp`` of the rows read: Pyro constrains a
``PyroParam`` whole before a plate subsamples it, which is O(N) in a step of B items.
"""

from operator import attrgetter

import torch
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroModule, PyroParam
from pyro.ops.tensor_utils import periodic_repeat
from pyro.poutine.util import site_is_subsample
from torch import nn
from torch.distributions import biject_to

# The amortised encoder's hidden width: small, as a per-item posterior of a few coordinates needs.
HIDDEN = 64


class PerItem(PyroModule):
    """``locs`` and ``log_precisions`` tables per local site (see the module's docstring); with a
    ``context_dim``, also ``contexts``: a learned row of that width per item, for a local flow."""

    def __init__(self, trace, names, context_dim=None):
        super().__init__()
        self.context_dim = context_dim
        for name in names:
            site = trace.nodes[name]
            loc = full_size_value(site)
            event_dim = site["fn"].event_dim
            deep_setattr(self, "locs." + name, PyroParam(loc, event_dim=event_dim))
            deep_setattr(self, "log_precisions." + name, PyroParam(torch.zeros_like(loc), event_dim=event_dim))
            if context_dim is not None:
                # Random, not zero: a flow's map of the context starts at zero and learns from these.
                contexts = torch.randn(loc.shape[: loc.dim() - event_dim] + (context_dim,))
                deep_setattr(self, "contexts." + name, PyroParam(contexts, event_dim=1))

    def forward(self, name, features=None):
        return attrgetter(name)(self.locs), attrgetter(name)(self.log_precisions).exp()

    def context(self, name, features=None):
        """Each current item's context for a local flow, ``(*items, context_dim)``."""
        return attrgetter(name)(self.contexts)

    def tables(self):
        """The per-item tables, as the leaf tensors trained: Adam steps them lazily (:mod:`~vi_flows.item_steps`)."""
        return list(self.parameters())


class Amortized(PyroModule):
    """One encoder per local site: an item's features to its pseudo-observation (see the module's
    docstring). ``features[plate]`` are the features of the plate's current items, ``(items, F)``."""

    def __init__(self, trace, names, features, plates):
        super().__init__()
        self.plates, self.per_item_shapes = {}, {}
        for name in names:
            site = trace.nodes[name]
            (plate,) = plates[name]
            frame = next(frame for frame in site["cond_indep_stack"] if frame.name == plate)
            value = biject_to(site["fn"].support).inv(site["value"]).detach()
            # Per item: the coordinates right of the plate's dimension.
            per_item = value.shape[value.dim() + frame.dim - site["fn"].event_dim + 1 :]
            self.plates[name], self.per_item_shapes[name] = plate, per_item
            size = per_item.numel()
            start = torch.cat([value.mean().expand(size), torch.zeros(size)])
            deep_setattr(self, "encoders." + name, Encoder(features[plate].shape[-1], 2 * size, start))
        self._feature_index = {plate: str(index) for index, plate in enumerate(features)}
        for plate, data in features.items():
            self.register_buffer("feature_centre_" + self._feature_index[plate], torch.zeros_like(data[0]))
            self.register_buffer("feature_spread_" + self._feature_index[plate], torch.ones_like(data[0]))
            self.set_standardisation(plate, data)

    @torch.no_grad()
    def set_standardisation(self, plate, data):
        """Standardise the plate's features by the mean and sd of ``data`` (items, F), so that the first
        layer suits data of any scale; a feature constant in ``data`` is only centred (a pixel blank in
        every image seen would otherwise be divided by about zero where another image inks it)."""
        index = self._feature_index[plate]
        spread = data.std(0)
        getattr(self, "feature_centre_" + index).copy_(data.mean(0))
        getattr(self, "feature_spread_" + index).copy_(torch.where(spread > 1e-6 * spread.max().clamp(min=1e-30), spread, 1.0))

    def standardise(self, plate, features):
        index = self._feature_index[plate]
        return (features - getattr(self, "feature_centre_" + index)) / getattr(self, "feature_spread_" + index)

    context_dim = HIDDEN

    def forward(self, name, features):
        plate = self.plates[name]
        output = attrgetter(name)(self.encoders)(self.standardise(plate, features[plate]))
        loc, log_precision = output.chunk(2, dim=-1)
        shape = (len(output),) + self.per_item_shapes[name]
        return loc.reshape(shape), log_precision.clamp(max=30.0).exp().reshape(shape)

    def context(self, name, features):
        """Each current item's context for a local flow: its encoder's hidden layer, ``(items, HIDDEN)``."""
        plate = self.plates[name]
        return attrgetter(name)(self.encoders).hidden(self.standardise(plate, features[plate]))


def plate_features(trace, plates, plate_depth, given=None):
    """``{plate: (items, F)}``: the values of the observed sites in each of ``plates``, one row per
    item of the trace's subsample (all of the item's values in the model's other plates and its
    event, flattened), joined in the order the model observes them; or, for a plate in ``given``
    (:func:`check_given_features`), its rows for the subsample's items. ``plate_depth`` is how many
    plates deep the model goes: dimensions left of those (particles) are not data."""
    features = {}
    for plate in plates:
        if given and plate in given:
            features[plate] = given[plate][trace.nodes[plate]["value"]]
            continue
        rows = []
        for name, site in trace.nodes.items():
            frame = next((frame for frame in site.get("cond_indep_stack", ()) if frame.name == plate), None)
            if site["type"] != "sample" or not site["is_observed"] or frame is None or site_is_subsample(site):
                continue
            kept = plate_depth + site["fn"].event_dim  # the model's plates and the event
            value = torch.broadcast_to(site["value"], torch.broadcast_shapes(site["value"].shape, site["fn"].shape()))
            value = value.reshape((1,) * max(kept - value.dim(), 0) + value.shape)
            value = value.reshape((-1,) + value.shape[value.dim() - kept :])[0]
            value = value.movedim(kept + frame.dim - site["fn"].event_dim, 0)
            rows.append(value.reshape(len(value), -1))
        if not rows:
            raise ValueError(
                f"amortised local posteriors read each item's data from the observed sites in its plate, and plate "
                f"{plate!r} holds none; use local='per-item' for its latents"
            )
        features[plate] = torch.cat(rows, -1).detach().to(torch.get_default_dtype())
    return features


def check_given_features(given, trace, plates):
    """A user's ``{plate: features}``, one row per item of each plate (``(N,)`` or ``(N, F)``), as
    ``(N, F)`` tensors; a clear error for a plate that is not amortised or a size that is not the plate's."""
    checked = {}
    for plate, features in given.items():
        if plate not in plates:
            raise ValueError(f"local_features names plate {plate!r}; the amortised local sites' plates are {list(plates)}")
        index = trace.nodes[plate]["value"]  # the subsample's indices, on the model's device
        features = torch.as_tensor(features).detach().to(device=index.device, dtype=torch.get_default_dtype())
        frames = (frame for site in trace.nodes.values() for frame in site.get("cond_indep_stack", ()) if frame.name == plate)
        full_size = next(frame.full_size or frame.size for frame in frames)
        if features.dim() not in (1, 2) or len(features) != full_size:
            raise ValueError(
                f"local_features[{plate!r}] has shape {tuple(features.shape)}; plate {plate!r} has {full_size} items: "
                "give one row (or one number) per item, in the plate's order"
            )
        checked[plate] = features.reshape(full_size, -1)
    return checked


class Encoder(nn.Module):
    """An affine map plus a one-hidden-layer correction, both from zero, so that every input starts at
    ``start`` and the pseudo-observations of a conjugate model, affine in the data, are exact."""

    def __init__(self, in_features, out_features, start):
        super().__init__()
        self.affine = nn.Linear(in_features, out_features)
        self.correction = nn.Sequential(nn.Linear(in_features, HIDDEN), nn.ELU(), nn.Linear(HIDDEN, out_features, bias=False))
        with torch.no_grad():
            self.affine.weight.zero_()
            self.affine.bias.copy_(start)
            self.correction[-1].weight.zero_()

    def hidden(self, features):
        return self.correction[1](self.correction[0](features))

    def forward(self, features):
        return self.affine(features) + self.correction[2](self.hidden(features))


@torch.no_grad()
def full_size_value(site):
    """A site's unconstrained initial value, repeated along each subsampled plate to its full size."""
    value = biject_to(site["fn"].support).inv(site["value"]).detach()
    event_dim = site["fn"].event_dim
    for frame in site["cond_indep_stack"]:
        full_size = frame.full_size or frame.size
        if full_size != frame.size:
            value = periodic_repeat(value, full_size, frame.dim - event_dim).contiguous()
    return value
