"""``fit``'s gradient clipping: elementwise, at a fixed bound or, on a subsampled plate, at a bound
that follows the gradient's own noise.

A fixed bound clips noise, not only spikes, where the noise is larger than the bound: with N = 10^5
groups subsampled to 256 (``benchmarks/local_scale.py``) the globals' gradient has an sd of about 20
and 61% of the steps were clipped at ``fit``'s default of 10. Clipping a skewed noise moves the mean of
what is left (tau's gradient, a sum of squares, has a long upper tail), so Adam settles where the
clipped mean, not the gradient's, is zero. With the local tables held at their exact values, tau
ended low in 6 fits of 6 clipped at 10 (-0.05 to -0.52 posterior sds), in 2 of 3 unclipped and 2 of 3
with this bound (-0.35 to +0.28). On a subsampled plate the bound is therefore at least
``NOISE_CLIP`` times the element's running root-mean-square (Adam's second moment): a spike is still
cut, the noise no longer. Full-batch fits keep the fixed bound, as Pyro's ``ClippedAdam`` does.
"""

import torch

NOISE_CLIP = 5.0


def clip_gradient(gradient, square, step, beta2, clip_norm, noise_clip):
    """``gradient`` clipped elementwise to ``[-bound, bound]``: ``clip_norm``, or with ``noise_clip``
    the larger of it and ``NOISE_CLIP`` times the running root-mean-square in ``square`` (Adam's
    second moment after ``step - 1`` steps; ``step`` a tensor)."""
    if not noise_clip:
        return gradient.clamp(-clip_norm, clip_norm)
    correction = (1 - beta2 ** (step - 1)).clamp(min=1e-12)
    bound = (NOISE_CLIP * (square / correction).sqrt()).clamp(min=clip_norm)
    return torch.minimum(torch.maximum(gradient, -bound), bound)
