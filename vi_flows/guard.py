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
    divergence, as is a non-finite loss. Medians, so that a lone heavy-tailed draw is not taken
    for a divergence. The start is the first checkpoint: a fit that diverges in its first block
    (the default fit of a 300-coefficient regression did, at the top of its warm-up) goes back to
    it, not to the last finite step, which is already on the way out.
    """

    def __init__(self, params, optimizer, block=100, tolerance=1.0):
        self.params, self.optimizer = params, optimizer
        self.block, self.tolerance = block, tolerance
        self.best_median, self.best_step, self._threshold = math.inf, 0, math.inf
        self._best = [param.detach().clone() for param in params]
        self._optimizer_state = copy.deepcopy(optimizer.state_dict())

    def check(self, losses, loss_value):
        """After a step whose loss was ``loss_value`` (``losses``: the finite ones so far): None, or
        what diverged, in words."""
        if not math.isfinite(loss_value):
            return f"the loss was {loss_value} at step {len(losses)}"
        if len(losses) % self.block:
            return None
        recent = torch.tensor(losses[-self.block :], dtype=torch.float64)
        median = recent.median().item()
        # A step with a finite loss can still leave NaN parameters (a NaN gradient): not a checkpoint.
        if median < self.best_median and all(param.isfinite().all() for param in self.params):
            spread = 1.4826 * (recent - median).abs().median().item()  # a normal's sd, from the MAD
            self.best_median, self.best_step = median, len(losses)
            self._threshold = median + self.tolerance + spread
            self._checkpoint()
        elif median > self._threshold:
            return f"the median loss rose to {median:.6g} over steps {len(losses) - self.block + 1}-{len(losses)}"
        return None

    def best(self):
        """Where the checkpoint is from, in words."""
        if self.best_step == 0:
            return "the start"
        return f"steps {self.best_step - self.block + 1}-{self.best_step} (median loss {self.best_median:.6g})"

    @torch.no_grad()
    def restore(self):
        """Put back the parameters and optimiser state of the best block, or of the start (in place:
        the parameters stay the tensors a compiled loss reads)."""
        torch._foreach_copy_(list(self.params), self._best)
        self.optimizer.load_state_dict(copy.deepcopy(self._optimizer_state))

    @torch.no_grad()
    def _checkpoint(self):
        torch._foreach_copy_(self._best, list(self.params))
        self._optimizer_state = copy.deepcopy(self.optimizer.state_dict())
