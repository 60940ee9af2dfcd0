"""The one place that reaches into Pyro's private internals, so that a Pyro upgrade touches one file.

Each function says which private API it wraps and what it returns in public terms.
"""

import logging

from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoContinuous


def setup(guide, *args, **kwargs):
    """Set an ``AutoContinuous`` guide up for the model's arguments, if it is not yet (Pyro's
    ``_setup_prototype``, which its guides otherwise run at their first call)."""
    if guide.prototype_trace is None:
        guide._setup_prototype(*args, **kwargs)
    return guide


def setup_continuous_prototype(guide, *args, allow_empty=False, **kwargs):
    """Run ``AutoContinuous._setup_prototype``; with ``allow_empty``, a prototype without latent sites
    (the guide hides them all) sets the guide up with ``latent_dim`` 0 where Pyro raises."""
    try:
        AutoContinuous._setup_prototype(guide, *args, **kwargs)
    except RuntimeError:
        if not (allow_empty and getattr(guide, "latent_dim", None) == 0):
            raise


def unpack_latent(guide, latent):
    """``[(prototype site, unconstrained value), ...]`` of a packed latent vector (``_unpack_latent``)."""
    return list(guide._unpack_latent(latent))


def latent_site(guide):
    """The name of the sample site at which an ``AutoContinuous`` guide draws its packed latent
    (``sample_latent``'s ``"_{name}_latent"``)."""
    return f"_{guide._pyro_name}_latent"


def plate_depth(guide):
    """How many plate dimensions the guide's sites sit in (from ``_prototype_frames``): Pyro unpacks
    draws that sit left of all of them."""
    return max((-frame.dim for frame in guide._prototype_frames.values()), default=0)


def max_plate_nesting(model, guide, *args, **kwargs):
    """How many plates deep the model's sites sit, so draws can be vectorised to their left."""
    # Pyro counts plates from a guide trace and a replayed model trace (no prior draw, so
    # ImproperUniform sites are fine) in ``_guess_max_plate_nesting``, which logs the count at INFO
    # level on every call.
    plate_counter = Trace_ELBO()
    elbo_logger = logging.getLogger("pyro.infer.elbo")
    level = elbo_logger.level
    elbo_logger.setLevel(logging.WARNING)
    try:
        plate_counter._guess_max_plate_nesting(model, guide, args, kwargs)
    finally:
        elbo_logger.setLevel(level)
    return plate_counter.max_plate_nesting


def trained_parameters(loss):
    """The unconstrained tensors behind every ``pyro.param`` that ``loss()`` reads, once each, found as
    Pyro's ``SVI`` finds them (a constrained parameter's ``unconstrained()`` link)."""
    with poutine.trace(param_only=True) as capture:
        loss()
    # Once each: Pyro's own flow guides store one tensor under two names (pyro issue 3132).
    unique = {}
    for site in capture.trace.nodes.values():
        param = site["value"].unconstrained()
        unique[id(param)] = param
    return list(unique.values())


def name_module(module, name):
    """Give a root ``PyroModule`` the name its parameters are stored under (``_pyro_name``), before
    any submodule is attached."""
    module._pyro_name = name


def check_param_store(module):
    """Raise a ``ValueError`` where Pyro's param store holds, under a name this ``PyroModule``'s
    parameters will read, a tensor of another shape (another guide of the same name put it there):
    Pyro would hand that tensor to this module and fail later with a size mismatch."""
    import pyro

    own = {_store_key(name): param.shape for name, param in module.named_parameters()}
    prefix = module._pyro_name + "."
    for key, value in pyro.get_param_store().items():
        name = _store_key(key[len(prefix) :]) if key.startswith(prefix) else None
        if name in own and value.shape != own[name]:
            raise ValueError(
                f"Pyro's param store already holds {key!r} with shape {tuple(value.shape)}, put there by another "
                f"guide named {module._pyro_name!r}; this guide's has shape {tuple(own[name])}. Call "
                "pyro.clear_param_store() before creating this guide, or give each guide its own name, e.g. "
                f"AutoFlow(model, name={module._pyro_name + '_2'!r})."
            )


def subsample_of(param):
    """``(dim, indices)`` along which a subsampled plate read ``param``'s rows at its last read
    through one (Pyro's ``_pyro_subsample``, which the plate sets as it index-selects the value), or
    None where no plate, or plates along several dimensions, subsampled it."""
    subsample = getattr(param, "_pyro_subsample", {})
    return next(iter(subsample.items())) if len(subsample) == 1 else None


def forget_subsample(param):
    """Drop the record :func:`subsample_of` reads (it holds the last subsample's indices)."""
    param.__dict__.pop("_pyro_subsample", None)


def after_every_handler(msg, function):
    """Have ``function(msg)`` called once every handler has processed the message ``msg`` (its
    ``continuation``), after any continuation already set: a handler outside a plate sees a
    parameter's value there as the plate left it (subsampled)."""
    previous = msg["continuation"]

    def both(msg):
        if previous is not None:
            previous(msg)
        function(msg)

    msg["continuation"] = both


def _store_key(name):
    # Pyro joins plain nn.Module submodules' names with "$$$" and stores a constrained parameter
    # under its own name, the module under name + "_unconstrained".
    return name.replace("$$$", ".").removesuffix("_unconstrained")
