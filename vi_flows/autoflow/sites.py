"""Which latent sites of a model a single global continuous guide can represent."""


def check_latent_sites(trace):
    """Raise a ``ValueError`` for latent sites a single global continuous guide cannot represent."""
    latent_sites = list(trace.iter_stochastic_nodes())
    if not latent_sites:
        raise ValueError(
            "the model has no latent sample site (every site is observed or a pyro.factor), so "
            "there is no posterior to approximate; use an empty guide, e.g. `lambda *args, **kwargs: None`"
        )
    for name, site in latent_sites:
        if site["fn"].support.is_discrete:
            raise ValueError(
                f"latent site {name!r} is discrete ({type(site['fn']).__name__}); AutoFlow models continuous "
                "latents only. Enumerate it out (pyro.infer.config_enumerate with TraceEnum_ELBO) and hide it "
                f"from this guide, e.g. AutoFlow(poutine.block(model, hide=[{name!r}])), or combine guides "
                "with pyro.infer.autoguide.AutoGuideList; see https://pyro.ai/examples/enumeration.html"
            )
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.full_size is not None and frame.size != frame.full_size:
                raise ValueError(
                    f"latent site {name!r} lies in plate {frame.name!r}, subsampled to {frame.size} of "
                    f"{frame.full_size}; a global guide would learn one value per subsample slot, not one per "
                    "data point, and silently mix different points' posteriors. Do not subsample plates that "
                    "hold local latents, or give those latents their own local (amortised) guide through "
                    "AutoGuideList."
                )
