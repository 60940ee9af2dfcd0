"""A traced graph of ATen operations written to bytes and rebuilt, node by node, in another process.

Pickling an ``fx.GraphModule`` re-traces its code symbolically on arrival, which runs every operation
without a traced input (a random draw of a given shape) and freezes its result into the graph as a
constant; Inductor's own graph pickler refuses the ``prims`` operations a ``make_fx`` trace holds. A
``make_fx`` graph is a list of calls of operator overloads on earlier nodes, numbers and the graph's
tensors, so it is written and rebuilt as that list: the graph that arrives computes what was sent,
and two processes that build it the same way (:func:`rebuilt`) give Inductor's cache the same key.
"""

import hashlib
import operator
import pickle

import torch
from torch.fx.node import Node, map_aggregate

# Python callables a make_fx graph may call besides operator overloads.
_PYTHON_TARGETS = {("operator", "getitem"): operator.getitem}


class _NodeRef:
    """An argument that is an earlier node, by name."""

    def __init__(self, name):
        self.name = name


def pack(graph):
    """``graph`` (an ``fx.GraphModule`` of operator overloads) as bytes; ValueError where it calls
    something else."""
    return pickle.dumps((_nodes(graph), _constants(graph)), protocol=pickle.HIGHEST_PROTOCOL)


def unpack(data):
    """The ``fx.GraphModule`` that :func:`pack` wrote."""
    nodes, constants = pickle.loads(data)
    graph, built = torch.fx.Graph(), {}

    def resolve(value):
        return built[value.name] if isinstance(value, _NodeRef) else value

    for op, name, target, args, kwargs in nodes:
        target = _resolve_target(target) if op == "call_function" else target
        built[name] = graph.create_node(op, target, map_aggregate(args, resolve), map_aggregate(kwargs, resolve), name=name)
    return torch.fx.GraphModule(constants, graph)


def rebuilt(graph):
    """``graph`` packed and unpacked, as another process rebuilds it (so both compile the same
    module), and its bytes."""
    data = pack(graph)
    return unpack(data), data


def fingerprint(graphs, example_inputs, *settings):
    """A hex digest of ``graphs``' operations, the layouts of their constants and inputs, and
    ``settings``: equal in every process that traces the same step. Not the constants' values: the
    rebuilt module holds them as buffers, which Inductor takes as inputs, so its cache serves a step
    whatever they are (the data, a random start)."""
    digest = hashlib.sha256(repr((layouts(example_inputs), settings, torch.__version__)).encode())
    for graph in graphs:
        digest.update(pickle.dumps(_nodes(graph), protocol=pickle.HIGHEST_PROTOCOL))
        digest.update(repr([(name, layouts([tensor])) for name, tensor in _constants(graph).items()]).encode())
    return digest.hexdigest()


def layouts(tensors):
    """What a compiler needs of example inputs (shape, strides, dtype, device, requires_grad), not their values."""
    return [(tuple(x.shape), x.stride(), x.dtype, str(x.device), x.requires_grad) for x in tensors]


def empty_inputs(input_layouts):
    """Uninitialised tensors of the given :func:`layouts`."""
    return [torch.empty_strided(shape, stride, dtype=dtype, device=device).requires_grad_(grad) for shape, stride, dtype, device, grad in input_layouts]


def _nodes(graph):
    """``graph``'s nodes as (op, name, target, args, kwargs), earlier nodes named, targets by name."""
    nodes = []
    for node in graph.graph.nodes:
        target = node.target if node.op != "call_function" else _target_name(node.target)
        args, kwargs = (map_aggregate(value, _ref) for value in (node.args, node.kwargs))
        nodes.append((node.op, node.name, target, args, kwargs))
    return nodes


def _constants(graph):
    return {node.target: getattr(graph, node.target) for node in graph.graph.nodes if node.op == "get_attr"}


def _ref(value):
    return _NodeRef(value.name) if isinstance(value, Node) else value


def _target_name(target):
    if isinstance(target, torch._ops.OpOverload):
        return ("op", target.namespace, target._opname, target._overloadname)
    for key, known in _PYTHON_TARGETS.items():
        if target is known:
            return ("python", *key)
    raise ValueError(f"cannot send a graph that calls {target!r}")


def _resolve_target(name):
    kind, *parts = name
    if kind == "python":
        return _PYTHON_TARGETS[tuple(parts)]
    namespace, op, overload = parts
    return getattr(getattr(getattr(torch.ops, namespace), op), overload)
