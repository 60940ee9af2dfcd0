"""Iterate averaging for fits by plateaus.

A Monte Carlo gradient's noise does not vanish at the optimum (on a subsampled plate it is
larger still), so the last iterate sits a random distance from it, a distance that shrinks only as
fast as the learning rate does. The mean of the iterates of the final, lowest-rate phase is much
closer (Polyak & Juditsky, "Acceleration of stochastic approximation by averaging", SIAM J. Control
Optim. 1992). Measured on the default fit of ``hierarchical_100`` (seed 0, full batch, 64
particles): the last iterate's mean of ``mu`` was 0.154 posterior sds off, the average of its last
3000 iterates 0.001 (RESULTS.md, "Time to a good posterior").
"""

import torch


class IterateAverage:
    """The running mean of ``params`` over the steps at which :meth:`update` is called."""

    def __init__(self, params):
        self.params = params
        self.mean, self.count = None, 0

    @torch.no_grad()
    def update(self):
        self.count += 1
        if self.mean is None:
            self.mean = [param.detach().clone() for param in self.params]
        else:
            torch._foreach_lerp_(self.mean, self.params, 1.0 / self.count)  # no_grad: no detach needed

    @torch.no_grad()
    def apply(self):
        """Set the parameters to their mean, if there is one."""
        if self.mean is not None:
            torch._foreach_copy_(self.params, self.mean)
