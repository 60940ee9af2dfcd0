"""The warnings a fit's step gives about its model and guide when it is set up: what it will do
otherwise than the user may expect (how the particles run, parameters it cannot train, local
posteriors it cannot refit), each saying why and what to do."""

import warnings

import torch


def warn_unless_broadcast(particles):
    if particles.mode == "vmap":
        warnings.warn(
            f"the model does not broadcast over a leading particle dimension ({particles.reason}); fit maps its log "
            "density over the guide's draws with torch.func.vmap instead, which gives the same ELBO."
        )
    elif particles.mode == "loop":
        warnings.warn(
            f"the model runs on one draw at a time only ({particles.reason}); fit takes its {particles.num} particles "
            "one after another, about as many times slower. Pass num_particles=... to fit to trade noise for speed."
        )


def warn_about_nested_locals(guide):
    """A warning for each guide inside ``guide`` (an ``AutoGuideList``'s part) with local posteriors
    on a subsampled plate: the control variate, the items' refits and the end checks are the methods
    of the guide ``fit`` is given, and run the part's own model, which does not see the other parts'
    values; its items' rows are stepped alone, as they were before any of them."""
    if not isinstance(guide, torch.nn.Module) or hasattr(guide, "refit_items"):
        return
    for name, part in guide.named_modules():
        local = getattr(part, "locals", None)
        if hasattr(part, "refit_items") and local is not None and local.subsampled:
            warnings.warn(
                f"fit steps the local posteriors of {list(local.names)} (the guide's part {name!r}) on subsamples without the "
                "control variate, the items' refits or the check of their convergence, which apply to an AutoFlow fit on "
                "its own: where the likelihood is not Gaussian in the items the globals can end a posterior sd off (20,000 "
                "Poisson groups in subsamples of 64: 0.8-1.5 sds) and nothing will say so. Fit with that AutoFlow as the "
                "whole guide, or check against a full-batch fit."
            )


def warn_about_untrained(guide, params):
    if not isinstance(guide, torch.nn.Module):
        return
    trained = {id(param) for param in params}
    untrained = [name for name, param in guide.named_parameters() if id(param) not in trained and param.numel()]
    if untrained:
        warnings.warn(
            f"the guide's parameters {untrained} will not be trained: Pyro's param store holds other tensors "
            "under their names, so the loss reads those. Was another guide of the same name created in this "
            "param store before? Call pyro.clear_param_store() before creating this guide."
        )
