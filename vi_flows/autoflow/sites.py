"""Which latent sites of a model a global continuous guide can represent, and which are local."""

from pyro.poutine.util import site_is_subsample


def check_latent_sites(trace, has_locals=False):
    """Raise a ``ValueError`` for latent sites a single global continuous guide cannot represent, or
    for a model with no latent site (``has_locals``: the trace hides the local ones)."""
    latent_sites = list(trace.iter_stochastic_nodes())
    if not latent_sites and not has_locals:
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
            if _is_subsampled(frame):
                raise ValueError(
                    f"latent site {name!r} lies in plate {frame.name!r}, subsampled to {frame.size} of "
                    f"{frame.full_size}; a global guide would learn one value per subsample slot, not one per "
                    "data point, and silently mix different points' posteriors. Give it a local posterior: "
                    "AutoFlow(model, local='per-item')."
                )


def local_sites(trace):
    """The latent sites of a model trace that are local, in the order the model samples them: those in
    a plate that is subsampled or that also holds an observed site (a ``pyro.factor`` counts), so
    that each of the plate's items has its own posterior, fitted from its own data. Returns
    ``{site: plate names}``, the plates that make it local."""
    data_plates = set()
    for _, site in _sample_sites(trace):
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and (site["is_observed"] or _is_subsampled(frame)):
                data_plates.add(frame.name)
    local = {}
    for name, site in _sample_sites(trace):
        plates = tuple(frame.name for frame in site["cond_indep_stack"] if frame.name in data_plates)
        if not site["is_observed"] and plates:
            local[name] = plates
    return local


def subsampled_plates(trace):
    """``{plate name: frame}`` of the plates of ``trace`` that are subsampled."""
    return {
        frame.name: frame for _, site in _sample_sites(trace) for frame in site["cond_indep_stack"] if _is_subsampled(frame)
    }


def local_subsampled_plate(trace, local_plates):
    """``{plate name: frame}`` of the one plate among ``local_plates`` that ``trace`` subsamples (empty
    where none does); raises ``NotImplementedError`` where several do."""
    subsampled = {name: frame for name, frame in subsampled_plates(trace).items() if name in local_plates}
    if len(subsampled) > 1:
        raise NotImplementedError(
            f"local latents in several subsampled plates ({', '.join(subsampled)}): AutoFlow starts, steps and draws "
            "the items of one subsampled plate. Subsample one of them (subsample_size=None for the others), or fit "
            "this model with Pyro's AutoNormal(model, create_plates=...)."
        )
    return subsampled


def check_locals_in_subsampled_plate(trace, local, subsampled):
    """A clear error where a plate of local latents is subsampled and some local site lies outside it
    (``local``: ``{site: its plates}``): the starts, the control variate and the draws read every local
    site a subsample of that plate at a time."""
    outside = {name: sorted(plates) for name, plates in local.items() if not any(frame.name in subsampled for frame in trace.nodes[name]["cond_indep_stack"])}
    if subsampled and outside:
        raise NotImplementedError(
            f"plate {', '.join(subsampled)} is subsampled and the local latents {outside} lie outside it: AutoFlow's "
            "local posteriors read every local site a subsample of that plate at a time. Fit without subsampling "
            "(subsample_size=None), or with Pyro's AutoNormal(model, create_plates=...)."
        )


def _sample_sites(trace):
    return [(name, site) for name, site in trace.nodes.items() if site["type"] == "sample" and not site_is_subsample(site)]


def _is_subsampled(frame):
    return frame.vectorized and frame.full_size is not None and frame.size != frame.full_size
