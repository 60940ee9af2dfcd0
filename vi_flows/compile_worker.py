"""Compiling in another process while the fit takes its first steps eagerly.

From an empty Inductor cache the default flow's step takes about 30 s to compile, mostly code
generation and ``g++`` (RESULTS.md, "Time to a good posterior"), while many posteriors are nearly
there after a few hundred steps. A thread cannot compile meanwhile: the two share the interpreter's
lock, and eager steps ran 3-4x slower beside one. A worker process compiles the graphs into
Inductor's on-disk cache (at a lower priority than the fit); the fit then compiles them itself from
that cache, in seconds. Where Inductor's cache already holds them (:func:`known`), no worker is needed.
"""

import os
import pickle
import subprocess
import sys
import tempfile

from .graph_transfer import empty_inputs, fingerprint, layouts, rebuilt, unpack
from .inductor import cache_marker, compile_graph


def known(fingerprint):
    """Whether graphs of this fingerprint (:func:`~vi_flows.graph_transfer.fingerprint`) were compiled
    into the current Inductor cache."""
    return os.path.exists(cache_marker(fingerprint))


def remember(fingerprint):
    """Record that graphs of this fingerprint are in the current Inductor cache."""
    path = cache_marker(fingerprint)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w"):
        pass


class CompileWorker:
    """A process compiling packed graphs (``jobs``: ``(bytes, input layouts)`` pairs, from
    :func:`~vi_flows.graph_transfer.pack` and :func:`~vi_flows.graph_transfer.layouts`) for
    ``num_threads`` intra-op threads into Inductor's cache."""

    def __init__(self, jobs, num_threads):
        handle, self._path = tempfile.mkstemp(prefix="vi-flows-graphs-", suffix=".pkl")
        with os.fdopen(handle, "wb") as file:
            pickle.dump((jobs, num_threads), file, protocol=pickle.HIGHEST_PROTOCOL)
        command = [sys.executable, "-m", "vi_flows.compile_worker", self._path]
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # this process's vi_flows
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment)

    def wait(self):
        self._process.communicate()
        self._remove_file()

    def stop(self):
        if self._process.poll() is None:
            self._process.kill()
            self._process.communicate()
        self._remove_file()

    def _remove_file(self):
        if os.path.exists(self._path):
            os.remove(self._path)


class Compilation:
    """``graphs`` (``(fx.GraphModule, example inputs)`` pairs) compiled by Inductor for
    ``num_threads`` intra-op threads: here and now, or with ``in_background`` (where Inductor's
    cache lacks them) first by a :class:`CompileWorker` while the caller goes on. :meth:`result`
    gives the compiled callables, waiting for the worker if need be; a failure raises there."""

    def __init__(self, graphs, num_threads, in_background):
        self._num_threads, self._worker, self._compiled, self._fingerprint = num_threads, None, None, None
        examples = [example_inputs for _, example_inputs in graphs]
        try:  # both processes compile the graphs as rebuilt from bytes, so Inductor's keys agree
            sent = [rebuilt(graph) for graph, _ in graphs]
        except Exception:  # a call or an argument that cannot be written: the graph is compiled here as it is
            self._graphs = list(graphs)
        else:
            self._graphs = [(graph, example_inputs) for (graph, _), example_inputs in zip(sent, examples)]
            self._fingerprint = fingerprint([graph for graph, _ in sent], [x for example_inputs in examples for x in example_inputs], num_threads)
            if in_background and not known(self._fingerprint):
                self._worker = CompileWorker([(data, layouts(example_inputs)) for (_, data), example_inputs in zip(sent, examples)], num_threads)
                return
        self.result()

    @property
    def in_background(self):
        """Whether a worker is still compiling (until :meth:`result`)."""
        return self._worker is not None

    def result(self):
        if self._compiled is None:
            if self._worker is not None:
                worker, self._worker = self._worker, None
                worker.wait()  # where it failed, compiling here meets the error again and raises it
            self._compiled = [compile_graph(graph, inputs, self._num_threads) for graph, inputs in self._graphs]
            if self._fingerprint is not None:
                remember(self._fingerprint)
        return self._compiled

    def stop(self):
        """Stop the worker, if any (the fit ended first)."""
        if self._worker is not None:
            self._worker.stop()
            self._worker = None


def _main(path):
    if hasattr(os, "nice"):
        os.nice(10)  # the fit's own steps come first
    with open(path, "rb") as file:
        jobs, num_threads = pickle.load(file)
    for data, input_layouts in jobs:
        compile_graph(unpack(data), empty_inputs(input_layouts), num_threads)


if __name__ == "__main__":
    _main(sys.argv[1])
