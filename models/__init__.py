"""The bundled model zoo, importable as ``vi_flows.models``.

Each module defines ``model`` (a Pyro model), ``DESCRIPTION`` (one line), ``LOG_Z`` (the log
normaliser of the unnormalised posterior the model defines, or ``None`` if unknown) and, where
known, ``sample_posterior(num_samples)`` returning exact draws ``{site: tensor}``.
"""

# The models with LOG_Z and sample_posterior, used by the KL benchmark.
KNOWN_LOG_Z = ("correlated_gaussian", "banana", "funnel", "gaussian_mixture")
