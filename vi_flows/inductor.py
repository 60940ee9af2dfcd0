"""Compiling an already traced graph with TorchInductor, without TorchDynamo: the one place that
reads PyTorch's private compiler API, so a PyTorch upgrade touches this file only.

``fit``'s step is a graph of ATen operations traced with ``make_fx`` (:mod:`~vi_flows.compiled_step`).
Handing it to ``torch.compile`` makes Dynamo trace its Python code once more, op by op, before
Inductor's cache is even asked: on the default flow's step (about 3600 operations, the 10-D funnel)
that took 8 s of the 8.1 s a compile cost with every cache warm. Inductor's ``compile_fx``, the
function Dynamo calls, takes the graph as it is; given a fake-tensor context with a shape
environment (what Dynamo would have made), its FX graph cache answers as under Dynamo.

Inductor writes the thread count into its CPU kernels; it is passed in (the threads the fit will
step on), not read from the global setting. On the CPU the step's kernels are called from C++
(Inductor's ``cpp_wrapper``), not from a Python function: that function, one call per kernel and
per buffer, was a third of a small model's step (the banana's 0.45 ms, 0.31 ms without it;
the funnel's 1.0 ms, 0.79), and compiling costs no more (``python benchmarks/compile_cost.py``).
"""

import contextlib
import logging
import os
import threading
import warnings

import torch

try:  # private: its home has moved between releases
    from torch._guards import TracingContext, tracing
    from torch._inductor import config, cpu_vec_isa
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
except ImportError:  # pragma: no cover - fall back to the public route
    compile_fx = cache_dir = cpu_vec_isa = None

_cpu_probe = None
_probed_vec_isas = None if cpu_vec_isa is None else cpu_vec_isa.valid_vec_isa_list  # Inductor caches its answer


def start_probing_cpu():
    """Start Inductor's once-per-process probe of the CPU's vector instructions in a thread, so that
    it overlaps the tracing and lowering that precede Inductor's first use of its answer. The probe
    loads a test library in a child Python per instruction set, about 1 s, paid even when every
    graph comes from Inductor's cache (a third of building the default flow's step from the cache,
    ``compile_cost.py banana``); with an empty cache it first compiles them (six g++ runs, three of
    them over ATen's vector headers: about 7 s)."""
    global _cpu_probe
    if _cpu_probe is None and _probed_vec_isas is not None:
        _cpu_probe = threading.Thread(target=_probe_quietly, name="vi-flows-cpu-probe", daemon=True)
        _cpu_probe.start()


def _probe_quietly():
    with contextlib.suppress(Exception):  # compiling probes again, and raises there
        _probed_vec_isas()


@contextlib.contextmanager
def _waiting_for_the_cpu_probe():
    """Inductor asks for the probe's answer when it writes kernels, 10-17 s into a compile from an
    empty cache: it waits for the probe's thread there, not before compiling, which saves about 6 s
    of such a compile. (Inductor's cache of the answer takes no lock: asked meanwhile, it would
    probe twice.)"""
    if _cpu_probe is None:
        yield
        return

    def after_the_probe():
        _cpu_probe.join()
        return _probed_vec_isas()

    asked, cpu_vec_isa.valid_vec_isa_list = cpu_vec_isa.valid_vec_isa_list, after_the_probe
    try:
        yield
    finally:
        cpu_vec_isa.valid_vec_isa_list = asked


def compile_graph(graph, example_inputs, num_threads):
    """``graph`` (an ``fx.GraphModule`` of ATen operations) compiled by Inductor for inputs shaped
    as ``example_inputs`` (static shapes) and ``num_threads`` intra-op threads; a callable of the
    same inputs. Nothing is run. Compiled for inference: a gradient the graph needs is in it."""
    if compile_fx is None:
        return torch.compile(graph, fullgraph=True, dynamic=False)
    on_cpu = all(x.device.type == "cpu" for x in example_inputs if isinstance(x, torch.Tensor))
    with warnings.catch_warnings(), _quiet_dispatcher_fallbacks(), _waiting_for_the_cpu_probe(), torch.no_grad(), config.patch({"cpp.threads": num_threads, "cpp_wrapper": on_cpu}):
        # The compiler's own deprecation notices say nothing about the user's model.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\._inductor")
        with tracing(TracingContext(FakeTensorMode(shape_env=ShapeEnv()))):
            return compile_fx(graph, list(example_inputs))


@contextlib.contextmanager
def _quiet_dispatcher_fallbacks():
    """Without the warning Inductor logs for each operation its C++ wrapper calls through PyTorch's
    dispatcher (those without a C shim, such as the flows' triangular solves): a detail of the
    compiler, which works, that says nothing about the user's model."""
    logger = logging.getLogger("torch._inductor.ir")

    def keep(record):
        return "c-shim" not in record.getMessage()

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def cache_marker(name):
    """The path of a file ``name`` kept beside Inductor's on-disk cache (so cleared with it)."""
    return os.path.join(cache_dir(), "vi_flows", name)
