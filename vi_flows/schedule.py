"""The learning rate of a fit: a linear warm-up, then a fixed geometric decay or a cut at every plateau."""

import math

import torch


def has_converged(losses, window):
    """True when the mean loss of the last ``window`` steps is no lower than that of the window
    before by more than two standard errors of the difference: the ELBO has stopped improving."""
    if len(losses) < 2 * window:
        return False
    previous = torch.tensor(losses[-2 * window : -window])
    last = torch.tensor(losses[-window:])
    standard_error = math.sqrt((previous.var() + last.var()).item() / window)
    return (previous.mean() - last.mean()).item() < 2 * standard_error


class LearningRate:
    """``lr`` warmed up linearly over ``warmup_steps``, then, with ``num_steps``, decaying
    geometrically to ``final_fraction * lr`` at the last step; without, multiplied by ``factor``
    at every :meth:`cut` (a plateau, or a rollback after the loss diverged)."""

    def __init__(self, lr, warmup_steps, num_steps=None, final_fraction=0.1, factor=0.2):
        self.lr, self.warmup_steps, self.num_steps = lr, warmup_steps, num_steps
        self.final_fraction, self.factor = final_fraction, factor
        self.cuts = 0

    def cut(self):
        self.cuts += 1

    def __call__(self, step):
        rate = self.lr * min(1.0, (step + 1) / self.warmup_steps) * self.factor**self.cuts
        if self.num_steps is not None:
            decay_steps = max(self.num_steps - self.warmup_steps, 1)
            rate *= self.final_fraction ** (max(step - self.warmup_steps, 0) / decay_steps)
        return rate


class PlateauRule:
    """Counts plateaus of a loss trace (:func:`has_converged` over ``window`` steps, looked at every
    ``window`` steps once two windows have passed since the learning rate last changed)."""

    def __init__(self, window):
        self.window = window
        self.count = 0
        self._since = 0  # the step at which the rate last changed

    def restart(self, step):
        """The learning rate changed at ``step`` for another reason: judge only steps after it."""
        self._since = step

    def __call__(self, losses):
        """True when ``losses`` (all of them so far) end on a new plateau."""
        step = len(losses)
        if step % self.window or step - self._since < 2 * self.window or not has_converged(losses, self.window):
            return False
        self.count += 1
        self._since = step
        return True
