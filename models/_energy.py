"""The 2-D energies U1-U4 of Rezende & Mohamed (2015), made proper by a uniform box prior.

p(z) = exp(-U(z)) on the box [-BOX, BOX]^2; log Z and exact draws come from a fine grid.
"""

import math

import pyro
import pyro.distributions as dist
import torch

BOX = 4.0
_GRID_POINTS = 1200


def _w1(z):
    return torch.sin(2 * math.pi * z[..., 0] / 4)


def _w2(z):
    return 3 * torch.exp(-0.5 * ((z[..., 0] - 1) / 0.6) ** 2)


def _w3(z):
    return 3 * torch.sigmoid((z[..., 0] - 1) / 0.3)


def u1(z):
    radius = z.norm(dim=-1)
    modes = torch.stack([-0.5 * ((z[..., 0] - 2) / 0.6) ** 2, -0.5 * ((z[..., 0] + 2) / 0.6) ** 2], -1)
    return 0.5 * ((radius - 2) / 0.4) ** 2 - modes.logsumexp(-1)


def u2(z):
    return 0.5 * ((z[..., 1] - _w1(z)) / 0.4) ** 2


def u3(z):
    terms = torch.stack([-0.5 * ((z[..., 1] - _w1(z)) / 0.35) ** 2, -0.5 * ((z[..., 1] - _w1(z) + _w2(z)) / 0.35) ** 2], -1)
    return -terms.logsumexp(-1)


def u4(z):
    terms = torch.stack([-0.5 * ((z[..., 1] - _w1(z)) / 0.4) ** 2, -0.5 * ((z[..., 1] - _w1(z) + _w3(z)) / 0.35) ** 2], -1)
    return -terms.logsumexp(-1)


class Energy:
    """A Pyro model ``z ~ Uniform(box)``, ``factor(-U(z))`` with its grid log Z and sampler."""

    def __init__(self, energy):
        self.energy = energy
        edges = torch.linspace(-BOX, BOX, _GRID_POINTS + 1, dtype=torch.float64)
        self._centres = (edges[1:] + edges[:-1]) / 2
        self._cell = (edges[1] - edges[0]).item()
        grid = torch.stack(torch.meshgrid(self._centres, self._centres, indexing="ij"), -1)
        self._log_mass = -energy(grid).reshape(-1) + 2 * math.log(self._cell)
        # The uniform prior's density 1 / (2 BOX)^2 is part of the model's joint.
        self.log_z = self._log_mass.logsumexp(0).item() - 2 * math.log(2 * BOX)

    def model(self):
        z = pyro.sample("z", dist.Uniform(-BOX, BOX).expand([2]).to_event(1))
        pyro.factor("energy", -self.energy(z))

    def sample_posterior(self, num_samples):
        cells = torch.multinomial(torch.softmax(self._log_mass, 0), num_samples, replacement=True)
        rows, columns = cells // _GRID_POINTS, cells % _GRID_POINTS
        jitter = (torch.rand(num_samples, 2, dtype=torch.float64) - 0.5) * self._cell
        z = torch.stack([self._centres[rows], self._centres[columns]], -1) + jitter
        return {"z": z.float()}
