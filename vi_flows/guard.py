"""Rolling a fit back to its best parameters when its loss diverges.

Stochastic optimisation of a flow can leave a good optimum late in a fit: the centred eight schools,
seed 5, sat at a loss of 31.4 for 3000 steps at the full learning rate while the IAF's weights drifted
along directions the loss hardly sees, until at step 5820 the loss rose to 40 and then to 10^17, and
the fit ended 355 nats worse, with nothing said. A loss that rises well above the best it has held
(or turns NaN) is not noise; the guard keeps the parameters and optimiser state of the best stretch
of steps and puts them back.
"""

import copy
import math

import torch


class DivergenceGuard:
    """Watches a fit's losses in blocks of ``block`` steps.

    After each block it compares the block's median loss with the lowest median so far: a new best
    is checkpointed (``params`` and ``optimizer`` state copied), and a median more than
    ``tolerance`` nats plus one robust sd of a step's loss in the best block above it is a
    divergence, to be undone by :meth:`restore` (as is a non-finite loss, which ``fit`` sees itself). Medians, so that a lone
    heavy-tailed draw is not taken for a divergence.
    """

    def __init__(self, params, optimizer, block=100, tolerance=1.0):
        self.params, self.optimizer = params, optimizer
        self.block, self.tolerance = block, tolerance
        self.best_median, self.best_step, self._threshold = math.inf, None, math.inf
        self._params, self._optimizer_state = None, None

    @property
    def has_checkpoint(self):
        return self._params is not None

    def diverged(self, losses):
        """Look at the (finite) loss trace after a step; True when it has diverged (see the class)."""
        if len(losses) % self.block:
            return False
        recent = torch.tensor(losses[-self.block :], dtype=torch.float64)
        median = recent.median().item()
        if median < self.best_median:
            spread = 1.4826 * (recent - median).abs().median().item()  # a normal's sd, from the MAD
            self.best_median, self.best_step = median, len(losses)
            self._threshold = median + self.tolerance + spread
            self._checkpoint()
            return False
        return median > self._threshold

    def describe(self, losses):
        """What the guard saw at the last block, in words."""
        median = torch.tensor(losses[-self.block :], dtype=torch.float64).median().item()
        return f"the median loss rose to {median:.6g} over steps {len(losses) - self.block + 1}-{len(losses)}"

    def best(self):
        """Where the checkpoint is from, in words."""
        return f"steps {self.best_step - self.block + 1}-{self.best_step} (median loss {self.best_median:.6g})"

    @torch.no_grad()
    def _checkpoint(self):
        if self._params is None:
            self._params = [param.detach().clone() for param in self.params]
        else:
            for saved, param in zip(self._params, self.params):
                saved.copy_(param)
        self._optimizer_state = copy.deepcopy(self.optimizer.state_dict())

    @torch.no_grad()
    def restore(self):
        """Put back the parameters and optimiser state of the best block (in place: the parameters
        stay the tensors a compiled loss reads)."""
        for param, saved in zip(self.params, self._params):
            param.copy_(saved)
        self.optimizer.load_state_dict(copy.deepcopy(self._optimizer_state))
