"""The flow registry and the spec language ``name[*K]+name[*K]...``."""

import contextlib
import difflib
import functools
import importlib
import inspect
import re
from dataclasses import dataclass
from typing import Callable

from pyro.distributions.transforms import ComposeTransformModule
from torch.distributions import Transform

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*\Z")
_TERM = re.compile(r"\s*([^*\s]+)\s*(?:\*\s*(\S+)\s*)?\Z")
_SPEC_HELP = "write a spec as name[*K] terms joined by '+', e.g. 'householder*4+planar*8'"


@dataclass(frozen=True)
class FlowEntry:
    """A registered flow: ``factory(dim, **kwargs)`` builds one (or, if stackable, K) layers."""

    name: str
    factory: Callable
    description: str
    stackable: bool
    aliases: tuple = ()


_FLOWS: dict = {}
_ALIASES: dict = {}
_BUILTINS_LOADED = False


def _load_builtins():
    """Register the built-in flows (``vi_flows.flows.BUILTIN_FLOWS``) at the first use of the registry."""
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        importlib.import_module("vi_flows.flows")


def register_flow(
    name: str, *, description: str | None = None, stackable: bool = False, aliases: tuple = (), replace: bool = False
) -> Callable:
    """Register ``factory(dim, **kwargs) -> TransformModule`` under ``name`` (a decorator).

    A stackable factory also takes ``num_layers=K`` and builds K layers in one module (the fast
    path); otherwise ``name*K`` composes K separately built layers. ``description`` defaults to
    the first line of the factory's docstring. Re-registering a name needs ``replace=True``.

    Example::

        @register_flow("shift")
        def shift(dim):
            '''Learnable translation.'''
            return MyShift(dim)

        build_flow("shift*2+planar*4", dim=3)
    """
    _load_builtins()
    for label in (name, *aliases):
        if not _NAME.match(label):
            raise ValueError(f"flow name {label!r} must be lower-case letters, digits, '-' or '_'")
        taken = label in _FLOWS or label in _ALIASES
        if taken and not replace:
            raise ValueError(f"a flow named {label!r} is already registered; pass replace=True to replace it")

    def decorator(factory):
        doc_line = (factory.__doc__ or "").strip().split("\n")[0]
        _FLOWS[name] = FlowEntry(name, factory, description or doc_line, stackable, tuple(aliases))
        _ALIASES.pop(name, None)
        _ALIASES.update({alias: name for alias in aliases})
        return factory

    return decorator


def unregister_flow(name):
    """Remove the flow registered under ``name`` and its aliases (built-ins too)."""
    entry = get_flow(name)
    del _FLOWS[entry.name]
    for alias in entry.aliases:
        _ALIASES.pop(alias, None)
    return entry


@contextlib.contextmanager
def registered_flow(name, factory, **options):
    """Register ``factory`` under ``name`` (``register_flow``'s options) for the ``with`` block only,
    then restore the registry as it was, so that a test's flows do not leak into other tests::

        with registered_flow("my-flow", MyFlow):
            build_flow("my-flow*2", 3)
    """
    previous = _FLOWS.get(name)
    register_flow(name, replace=True, **options)(factory)
    try:
        yield
    finally:
        unregister_flow(name)
        if previous is not None:
            register_flow(previous.name, description=previous.description, stackable=previous.stackable, aliases=previous.aliases)(
                previous.factory
            )


def available_flows() -> dict:
    """Return ``{name: description}`` of every registered flow, in registration order."""
    _load_builtins()
    return {name: entry.description for name, entry in _FLOWS.items()}


def flow_aliases():
    """Return ``{alias: name}`` of every registered alias."""
    _load_builtins()
    return dict(_ALIASES)


def get_flow(name):
    """Return the :class:`FlowEntry` registered under ``name`` or an alias of it."""
    _load_builtins()
    canonical = _ALIASES.get(name, name)
    if canonical not in _FLOWS:
        known = [*_FLOWS, *_ALIASES]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        aliases = ", ".join(f"{a} -> {n}" for a, n in _ALIASES.items())
        raise ValueError(
            f"unknown flow {name!r}{hint}. Registered flows: {', '.join(_FLOWS)}"
            + (f" (aliases: {aliases})" if aliases else "")
            + ". Add your own with vi_flows.register_flow."
        )
    return _FLOWS[canonical]


def parse_spec(spec: str) -> list:
    """Split ``"householder*4+planar*8"`` into ``[("householder", 4), ("planar", 8)]``.

    Names are resolved to registered (canonical) names; a malformed spec raises ``ValueError``
    naming the offending term.
    """
    _load_builtins()
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"flow spec must be a non-empty string, got {spec!r}; {_SPEC_HELP}")
    terms = []
    for position, term in enumerate(spec.split("+"), start=1):
        match = _TERM.match(term)
        if match is None:
            raise ValueError(f"malformed flow spec {spec!r}: term {position} {term.strip()!r} is not name[*K]; {_SPEC_HELP}")
        name, count = match.group(1), match.group(2)
        if count is not None and not (count.isdigit() and int(count) > 0):
            raise ValueError(
                f"malformed flow spec {spec!r}: in term {position} {term.strip()!r}, the layer count "
                f"{count!r} is not a positive integer; {_SPEC_HELP}"
            )
        terms.append((get_flow(name).name, 1 if count is None else int(count)))
    return terms


def build_flow(spec: str, dim: int, **kwargs) -> Transform:
    """Build the transform a spec describes, applied from the base outward, on R^dim.

    Keyword arguments named after a registered flow are dicts passed to that family only
    (``build_flow("householder*2+iaf", 5, iaf={"hidden_dim": 32})``); any other keyword
    argument is passed to every family in the spec.
    """
    _load_builtins()
    check_flow_options(spec, kwargs)
    family_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in _FLOWS or key in _ALIASES}
    family_kwargs = {_ALIASES.get(key, key): value for key, value in family_kwargs.items()}
    parts = []
    for name, count in parse_spec(spec):
        entry = _FLOWS[name]
        options = {**kwargs, **family_kwargs.get(name, {})}
        built = [entry.factory(dim, num_layers=count, **options)] if entry.stackable else [
            entry.factory(dim, **options) for _ in range(count)
        ]
        for transform in built:
            if not isinstance(transform, Transform):
                raise TypeError(f"flow {name!r} returned {type(transform).__name__}, not a torch Transform")
        parts.extend(built)
    return parts[0] if len(parts) == 1 else ComposeTransformModule(parts)


def _options(factory):
    """The keyword options a flow factory takes beyond ``dim`` and ``num_layers``; None if it takes any."""
    parameters = inspect.signature(factory).parameters.values()
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return None
    return [p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL][1:]


def check_flow_options(spec, options, owner="build_flow"):
    """Raise a ``TypeError`` naming any of ``options`` that no family of ``spec`` takes, with the
    options each family does take. ``options`` are as :func:`build_flow` takes them: a family's
    name with a dict of its own options, or an option for every family of the spec."""
    families = {name: _FLOWS[name] for name, _ in parse_spec(spec)}
    accepted = {name: _options(entry.factory) for name, entry in families.items()}
    accepted = {name: [o for o in names if o != "num_layers"] if names is not None else None for name, names in accepted.items()}

    def unknown(family, keys):
        return [key for key in keys if accepted[family] is not None and key not in accepted[family]]

    problems = []
    for key, value in options.items():
        family = _ALIASES.get(key, key)
        if family in _FLOWS:
            if family not in families:
                problems.append(f"{key!r} names a flow that is not in the spec {spec!r}")
            elif not isinstance(value, dict):
                problems.append(f"{key!r} must be a dict of that flow's options, got {type(value).__name__}")
            else:
                problems.extend(f"{family!r} takes no option {bad!r}" for bad in unknown(family, value))
        else:
            problems.extend(f"{family!r} takes no option {key!r}" for family in families if unknown(family, [key]))
    if problems:
        takes = "; ".join(f"{name}: {', '.join(names) or 'none'}" for name, names in accepted.items() if names is not None)
        raise TypeError(f"{owner}: {'; '.join(problems)}. Options each flow of the spec takes: {takes}.")


def transform_fn(spec: str, **flow_options) -> Callable:
    """Return an ``init_transform_fn`` for Pyro's own ``AutoNormalizingFlow``.

    Example::

        guide = pyro.infer.autoguide.AutoNormalizingFlow(model, vi_flows.transform_fn("planar*8"))
    """
    check_flow_options(spec, flow_options, owner="transform_fn")
    return functools.partial(build_flow, spec, **flow_options)
