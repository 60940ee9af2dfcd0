"""Energy U2 of Rezende & Mohamed (2015) on the box [-4, 4]^2."""

from ._energy import Energy, u2

DESCRIPTION = "2-D energy U2 of Rezende & Mohamed 2015 on [-4, 4]^2 (log Z by grid integration; exact draws)"
_ENERGY = Energy(u2)
model = _ENERGY.model
sample_posterior = _ENERGY.sample_posterior
LOG_Z = _ENERGY.log_z
