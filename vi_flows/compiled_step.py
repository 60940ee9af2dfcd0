"""A whole ``fit`` step as one compiled graph: the negative ELBO, its gradient, the clipping and
Adam's update.

Compiling the loss alone leaves a step with an autograd backward pass, a clip and an optimiser
call, each entered from Python: on the zoo's models about 0.15 ms of fixed cost, more than
NumPyro's whole jit-compiled step on a mean-field guide (``python benchmarks/numpyro_peer.py step``).
Tracing the gradient and the update into the loss's graph makes a step one call into compiled code.
Adam's moments stay in the optimiser's own state (``torch.optim.Adam``'s ``exp_avg``, ``exp_avg_sq``,
``step``), so its ``state_dict`` saves and restores them as in an eager fit.
"""

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from .clipping import clip_gradient
from .compiled_elbo import CompileError
from .compile_worker import Compilation
from .item_steps import lazy_mask
from .messages import first_line


class CompiledAdamStep:
    """``step(lr)``: one step of Adam (``optimizer``'s betas and eps) on the gradients that
    ``gradient_graph(*params)`` returns after the loss (a graph traced with them:
    :func:`~vi_flows.compiled_elbo.trace_negative_elbo`), clipped elementwise (:func:`~vi_flows.clipping.clip_gradient`), updating ``params``
    and ``optimizer``'s state in place, through one graph compiled with ``backend`` (None: the
    traced graph, uncompiled, which draws what eager mode draws) for ``num_threads`` intra-op
    threads (None: the current setting). Returns the loss before the step.
    The per-item ``tables`` among ``params`` are stepped lazily (:mod:`~vi_flows.item_steps`), and
    with ``noise_clip`` the clip follows the gradient's noise (:mod:`~vi_flows.clipping`).

    With ``reduce`` (a function of the loss and the gradients' list returning another such pair:
    data-parallel averaging, :mod:`~vi_flows.data_parallel`), the step is two graphs, the loss with
    its gradient and the update, with ``reduce`` run eagerly between them.

    Building it traces the update on fake tensors, joins it to the gradients' graph and compiles them (with ``in_background``, where
    Inductor's cache lacks them, a worker process compiles them meanwhile and :meth:`finish` waits
    for it: :mod:`~vi_flows.compile_worker`): nothing runs, no random number is drawn, ``params``
    keep their values; a parameter without Adam state gets it, zero, as ``torch.optim.Adam`` would
    at its first step. :meth:`warm_up` runs the step once on copies of its
    inputs. Raises :class:`~vi_flows.CompileError` where tracing, compiling or the warm-up fails.
    """

    def __init__(self, gradient_graph, params, optimizer, clip_norm, tables=(), noise_clip=False, backend="inductor", reduce=None, num_threads=None, in_background=False):
        group = optimizer.param_groups[0]
        if len(optimizer.param_groups) > 1 or group["weight_decay"] or group["amsgrad"] or group["maximize"]:
            raise ValueError("CompiledAdamStep takes plain Adam over one parameter group")
        self.params, self.optimizer = params, optimizer
        self._lr = torch.zeros((), dtype=torch.float64)
        lazy = [any(param is table for table in tables) for param in params]
        apply = _adam_apply(lazy, *group["betas"], group["eps"], clip_norm, noise_clip)
        self._reduce = reduce
        examples = _example_inputs(params, self._lr)
        count = len(params)
        gradients, indices = _example_gradients(gradient_graph, count)
        update = _traced(_update(gradient_graph.table_rows, apply, count), [*examples[:count], *gradients, *examples[count:], *indices])
        if reduce is None:
            traced = [(_joined(gradient_graph, update[0], count), examples)]
        else:
            traced = [(gradient_graph, examples[:count]), update]
        self._graphs = [graph for graph, _ in traced] if backend is None else None
        self._compilation = None
        if backend is not None:
            try:
                self._compilation = Compilation(traced, num_threads or torch.get_num_threads(), in_background)
            except Exception as failure:  # the compilers raise many types; eager mode still works
                raise CompileError(f"could not compile the ELBO ({first_line(failure)})") from failure
        for param in params:
            _init_adam_state(optimizer, param)

    def _inputs(self):
        """The graph's inputs: the params, their optimiser states, the rate. Read at every step:
        restoring a state_dict puts new tensors in the optimiser's state."""
        states = [self.optimizer.state[param] for param in self.params]
        averages, squares, steps = ([state[key] for state in states] for key in ("exp_avg", "exp_avg_sq", "step"))
        return (*self.params, *averages, *squares, *steps, self._lr)

    @property
    def in_background(self):
        """Whether a worker process is still compiling the step (:mod:`~vi_flows.compile_worker`)."""
        return self._compilation is not None and self._compilation.in_background

    def finish(self):
        """The compiled graphs, waiting for the worker compiling them if need be; CompileError where
        compiling fails."""
        if self._graphs is None:
            try:
                self._graphs = self._compilation.result()
            except Exception as failure:  # the compilers raise many types; eager mode still works
                raise CompileError(f"could not compile the ELBO ({first_line(failure)})") from failure
        return self._graphs

    def stop(self):
        """Stop compiling in the background, if it still is (the step will not be used)."""
        if self._compilation is not None:
            self._compilation.stop()

    @torch.no_grad()
    def warm_up(self):
        """Run the step once on copies of its inputs: the compiled code's first call, which loads it."""
        try:
            self._run(_example_inputs(self.params, self._lr), reduce=False)
        except Exception as failure:  # the compiled code raises many types; eager mode still works
            raise CompileError(f"the compiled step failed at its first run ({first_line(failure)})") from failure

    @torch.no_grad()
    def __call__(self, lr):
        self._lr.fill_(lr)
        return self._run(self._inputs(), reduce=self._reduce is not None).item()

    def _run(self, inputs, reduce):
        graphs = self._graphs if self._graphs is not None else self.finish()
        if self._reduce is None:
            return graphs[0](*inputs)
        gradient_graph, update_graph = graphs
        count = len(self.params)
        loss, *gradients = gradient_graph(*inputs[:count])
        gradients, indices = gradients[:count], gradients[count:]
        if reduce:  # the tables' rows, this rank's own, are not averaged
            loss, gradients = self._reduce(loss, gradients)
        update_graph(*inputs[:count], *gradients, *inputs[count:], *indices)
        return loss


def _example_inputs(params, lr):
    """Fresh inputs for the step: copies of the params, zero Adam moments and step counts, ``lr``."""
    with torch.no_grad():
        copies = [param.detach().clone().requires_grad_(param.requires_grad) for param in params]
        averages, squares = ([torch.zeros_like(param) for param in params] for _ in range(2))
        steps = [torch.zeros((), dtype=torch.float32, device=param.device) for param in params]  # as fused Adam keeps them
    return [*copies, *averages, *squares, *steps, lr.clone()]


def _traced(function, example_inputs):
    """``function`` traced (``make_fx``, on fake tensors: nothing runs) for inputs shaped as
    ``example_inputs``, and those inputs."""
    try:
        # Fake tensors: shapes only, so no random draw is taken from the fit's generator.
        return make_fx(function, tracing_mode="fake", _allow_non_fake_inputs=True)(*example_inputs), example_inputs
    except Exception as failure:  # tracing raises many types; eager mode still works
        raise CompileError(f"could not trace the step's update ({first_line(failure)})") from failure


def _init_adam_state(optimizer, param):
    """Create ``param``'s Adam state, where it has none, as ``torch.optim.Adam`` creates it at its first step."""
    state = optimizer.state[param]
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)  # as fused Adam keeps it
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def _update(layout, apply, count):
    """The update alone, a function of (params, gradients, first moments, second moments, step
    counts, lr, the indices of the tables read by rows, as
    :func:`~vi_flows.compiled_elbo.loss_and_gradients` gives them: ``layout`` says which)."""

    def update(*inputs):
        subsamples = [None] * count
        if layout is not None:
            for position, dim, indices in zip(layout.positions, layout.dims, inputs[5 * count + 1 :]):
                subsamples[position] = (dim, indices)
        apply(inputs[:count], *_split_state(inputs[count : 5 * count + 1], count), subsamples)

    return update


def _example_gradients(gradient_graph, count):
    """Zero gradients shaped as ``gradient_graph`` returns them (after the loss), and example
    indices of the tables read by rows (distinct, in range), from the shapes its trace recorded."""
    (output,) = (node for node in gradient_graph.graph.nodes if node.op == "output")
    values = [node.meta["val"] for node in output.args[0][1:]]
    gradients = [torch.zeros(value.shape, dtype=value.dtype, device=value.device) for value in values[:count]]
    indices = [torch.arange(value.shape[0], device=value.device) for value in values[count:]]
    return gradients, indices


def _split_state(inputs, count):
    """``(gradients, first moments, second moments, step counts, lr)`` of the update's inputs after the params."""
    return inputs[:count], inputs[count : 2 * count], inputs[2 * count : 3 * count], inputs[3 * count : 4 * count], inputs[4 * count]


def _joined(gradient_graph, update_graph, count):
    """The whole step as one graph of (params, first moments, second moments, step counts, lr),
    returning the loss: ``gradient_graph``'s nodes, then ``update_graph``'s (:func:`_update`) on
    their outputs. Joined node by node: traced once more as one function, the gradients would cost
    as long as their first trace."""
    graph, constants = torch.fx.Graph(), {}
    inputs = [node for node in update_graph.graph.nodes if node.op == "placeholder"]
    env = {node: graph.placeholder(node.name) for node in inputs[:count] + inputs[2 * count : 5 * count + 1]}
    own_inputs = [node for node in gradient_graph.graph.nodes if node.op == "placeholder"]
    copied = {node: env[param] for node, param in zip(own_inputs, inputs)}
    loss, *outputs = graph.graph_copy(gradient_graph.graph, copied)
    constants.update((node.target, getattr(gradient_graph, node.target)) for node in gradient_graph.graph.nodes if node.op == "get_attr")
    env.update(zip(inputs[count : 2 * count] + inputs[5 * count + 1 :], outputs))
    for node in update_graph.graph.nodes:
        if node.op == "get_attr":  # a constant of the update's, under a name of its own
            name = f"update_{node.target}"
            constants[name] = getattr(update_graph, node.target)
            env[node] = graph.get_attr(name)
        elif node.op not in ("placeholder", "output"):
            env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(loss)
    return torch.fx.GraphModule(constants, graph)


def _adam_apply(lazy, beta1, beta2, eps, clip_norm, noise_clip):
    """Adam's update of params and moments, in place, given the gradients, with torch.optim.Adam's
    arithmetic; lazily (:mod:`~vi_flows.item_steps`) for the params where ``lazy`` is true, on the
    rows read alone where ``subsamples`` gives them (``(dim, indices)``; the gradient is the rows')."""

    def apply(params, gradients, averages, squares, steps, lr, subsamples):
        step = steps[0].to(torch.float64) + 1  # the parameters step together
        step_size = lr / (1 - beta1**step)
        root_correction = (1 - beta2**step).sqrt()

        def adam(param, gradient, average, square):
            gradient = clip_gradient(gradient, square, step, beta2, clip_norm, noise_clip)
            average = average.lerp(gradient, 1 - beta1)
            square = square * beta2 + (1 - beta2) * gradient * gradient
            return param - step_size * average / (square.sqrt() / root_correction + eps), average, square

        with torch.no_grad():  # in place: the compiled graph writes the new values into its inputs
            for param, gradient, average, square, is_lazy, subsample in zip(params, gradients, averages, squares, lazy, subsamples):
                tensors = (param, average, square)
                if subsample is not None:  # the rows read: gathered, stepped, written back
                    dim, indices = subsample
                    param_rows, average_rows, square_rows = (tensor.index_select(dim, indices) for tensor in tensors)
                    new = adam(param_rows, gradient, average_rows, square_rows)
                    for tensor, value in zip(tensors, new):
                        tensor.index_copy_(dim, indices, value)
                    continue
                mask = lazy_mask(gradient) if is_lazy else None
                for tensor, value in zip(tensors, adam(param, gradient, average, square)):
                    tensor.copy_(value if mask is None else torch.where(mask, value, tensor))
            for step_count in steps:  # here, in compiled code: from Python they cost 0.01-0.04 ms a step
                step_count.add_(1)

    return apply
