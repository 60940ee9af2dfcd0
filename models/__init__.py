"""The bundled model zoo, importable as ``vi_flows.models``.

Each module defines ``model`` (a Pyro model), ``DESCRIPTION`` (one line), ``LOG_Z`` (the log
normaliser of the unnormalised posterior the model defines, or ``None`` if unknown) and, where
known, ``sample_posterior(num_samples)`` returning exact draws ``{site: tensor}``.
"""

# The models with LOG_Z and sample_posterior, used by the KL benchmark.
KNOWN_LOG_Z = ("correlated_gaussian", "banana", "funnel", "gaussian_mixture", "regression_scaled", "autoregression")


def reference_moments(module, num_samples=200_000, seed=0):
    """Exact ``{site: (mean, sd)}`` of a zoo model: closed form where the module has it, else
    moments of ``num_samples`` exact posterior draws."""
    if hasattr(module, "posterior_moments"):
        return module.posterior_moments()
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        draws = module.sample_posterior(num_samples)
    return {name: (values.mean(0), values.std(0)) for name, values in draws.items()}
