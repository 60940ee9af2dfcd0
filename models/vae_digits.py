"""A variational autoencoder of scikit-learn's 8x8 handwritten digits, binarised.

Each image :math:`x_i` (64 pixels) has a local latent :math:`z_i \\sim N(0, I_8)` in a subsampled
plate; a decoder network (a ``PyroModule``: its weights are the model's parameters, fitted with the
guide) maps it to the pixels' Bernoulli logits. The guide is any local posterior of ``AutoFlow``,
amortised: ``AutoFlow(vae, local="amortized", local_flow="sylvester*4")`` is the setting of van den
Berg et al. (2018) on a small data set that ships with scikit-learn (no download).

``model`` is one instance; fit a fresh :class:`DigitsVAE` (after ``pyro.clear_param_store()``) for
each independent run, since a fitted decoder keeps its weights.
"""

import functools

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

DESCRIPTION = "VAE of scikit-learn's 1797 binarised 8x8 digits: z ~ N(0, I_8) per image, MLP decoder (no log Z)"
LOG_Z = None
LATENT_DIM = 8
HIDDEN = 128
BATCH_SIZE = 100
NUM_TEST = 297  # the last images of a fixed shuffle; the other 1500 train


@functools.cache
def _split():
    from sklearn.datasets import load_digits

    pixels = torch.as_tensor(load_digits().data, dtype=torch.get_default_dtype())
    images = (pixels > 7).to(pixels.dtype)  # grey levels 0..16, binarised at the midpoint
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return images[order[:-NUM_TEST]], images[order[-NUM_TEST:]]


def train_images():
    """The 1500 training images, ``(1500, 64)`` of zeros and ones."""
    return _split()[0]


def test_images():
    """The 297 held-out images, ``(297, 64)``."""
    return _split()[1]


class DigitsVAE(PyroModule):
    """The model: ``vae(images, batch_size)`` scores a subsample of ``batch_size`` of ``images``
    (all of them with ``batch_size=None``); ``images`` default to the training images."""

    def __init__(self, latent_dim=LATENT_DIM, hidden=HIDDEN, pixels=64):
        super().__init__()
        self.latent_dim = latent_dim
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.Softplus(), nn.Linear(hidden, pixels))

    def forward(self, images=None, batch_size=BATCH_SIZE):
        images = train_images() if images is None else images
        prior = dist.Normal(images.new_zeros(self.latent_dim), 1.0).to_event(1)
        with pyro.plate("images", len(images), subsample_size=batch_size) as index:
            z = pyro.sample("z", prior)
            pyro.sample("pixels", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=images[index])


model = DigitsVAE()
