"""The digits VAE (``vi_flows.models.vae_digits``) with each amortised posterior: fit, score on the
held-out images, and the table of ``vi-flows vae`` (van den Berg et al. 2018, Table 1, in small)."""

import math
from dataclasses import dataclass

import pyro
import torch

from . import plots
from .autoflow import AutoFlow
from .fitting import FitResult, fit
from .item_likelihood import item_scores
from .models import vae_digits
from .report import markdown, plain_text

# The posteriors of the paper's Table 1, four layers each (one spec per row; None: the Gaussian).
POSTERIORS = {
    "gaussian": None,
    "planar": "planar*4",
    "iaf": "iaf*4",
    "sylvester-orthogonal": "sylvester-orthogonal*4",
    "sylvester-householder": "sylvester-householder*4",
    "sylvester-triangular": "sylvester-triangular*4",
}
# Chosen by measurement (RESULTS.md, "A VAE of the digits"): at 1e-2 the orthogonal Sylvester
# encoder diverged and rolled back, and its test ELBO fell to -51 nats; at 3e-3 every posterior fits.
LR = 3e-3
# Draws per test image for the importance-sampled log-likelihood (the paper takes 5000).
TEST_DRAWS = 5000


@dataclass
class VAERun:
    """One fitted VAE: its ``model`` (with the fitted decoder), ``guide``, the fit's ``result``, and the
    mean over the test images of the importance-sampled log-likelihood and its Monte Carlo standard
    error, the ELBO, its reconstruction and KL parts (nats per image), the share of test images whose
    importance weights have a PSIS k-hat above 0.7 (their log-likelihood is not to be trusted), and
    the seconds per epoch."""

    posterior: str
    seed: int
    model: object
    guide: object
    result: FitResult
    log_likelihood: float
    standard_error: float
    elbo: float
    reconstruction: float
    kl: float
    unreliable: float
    seconds_per_epoch: float


def steps_per_epoch():
    """Steps of ``BATCH_SIZE`` images in one pass over the training images."""
    return math.ceil(len(vae_digits.train_images()) / vae_digits.BATCH_SIZE)


def fit_vae(posterior, seed=0, epochs=400, lr=LR, test_draws=TEST_DRAWS, progress=False, compile="auto"):
    """Fit a fresh :class:`~vi_flows.models.vae_digits.DigitsVAE` with the amortised ``posterior`` (a
    name of :data:`POSTERIORS` or a flow spec) for ``epochs`` passes over the training images, one
    draw per image and step, and score it on the test images; returns a :class:`VAERun`. ``compile``
    is :func:`~vi_flows.fit`'s."""
    spec = POSTERIORS.get(posterior, posterior)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = vae_digits.DigitsVAE()
    guide = AutoFlow(model, local="amortized", local_flow=spec)
    result = fit(model, guide, num_steps=epochs * steps_per_epoch(), lr=lr, num_particles=1, seed=seed, progress=progress, compile=compile)
    seconds_per_epoch = (result.seconds - result.compile_seconds) / epochs
    test = vae_digits.test_images()
    scores = item_scores(model, guide, test, None, num_samples=test_draws)
    items = len(test)
    return VAERun(
        posterior,
        seed,
        model,
        guide,
        result,
        scores.log_likelihood.mean().item(),
        (scores.standard_error.pow(2).sum().sqrt() / items).item(),
        scores.elbo.mean().item(),
        scores.reconstruction.mean().item(),
        scores.kl.mean().item(),
        (scores.khat > 0.7).double().mean().item(),
        seconds_per_epoch,
    )


def epoch_elbos(result):
    """The training ELBO per image of each epoch: the mean of its steps' losses, negated."""
    losses, steps = torch.tensor(result.losses), steps_per_epoch()
    epochs = len(losses) // steps
    return -(losses[: epochs * steps].reshape(epochs, steps).mean(-1) / len(vae_digits.train_images()))


@torch.no_grad()
def reconstructions(run, num_images=8, seed=0):
    """``(images, decoded)``: the first test images and their decoded pixel probabilities at one draw
    of the posterior each, ``(num_images, 8, 8)`` each."""
    images = vae_digits.test_images()[:num_images]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        z = run.guide.sample_constrained(1, images, None)["z"][0]
    return images.reshape(-1, 8, 8), torch.sigmoid(run.model.decoder(z)).reshape(-1, 8, 8)


@torch.no_grad()
def prior_samples(run, num_images=16, seed=0):
    """Pixel probabilities decoded from ``num_images`` draws of the prior, ``(num_images, 8, 8)``."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(num_images, run.model.latent_dim, generator=generator)
    return torch.sigmoid(run.model.decoder(z)).reshape(-1, 8, 8)


# The table's scores: header and format of each.
COLUMNS = {
    "log_likelihood": ("test log-lik", "{:.2f}"),
    "elbo": ("test ELBO", "{:.2f}"),
    "reconstruction": ("reconstruction", "{:.2f}"),
    "kl": ("KL", "{:.2f}"),
    "unreliable": ("k-hat > 0.7", "{:.0%}"),
    "seconds_per_epoch": ("s/epoch", "{:.3f}"),
}


def summary_rows(runs):
    """Text rows (header first) of each posterior's scores over its seeds, in the order the runs
    came: the mean, and over two or more seeds ± half the range; the largest Monte Carlo standard
    error of the test log-likelihood."""
    rows = [["posterior", "seeds", "MC s.e.", *(header for header, _ in COLUMNS.values())]]
    for posterior in dict.fromkeys(run.posterior for run in runs):
        own = [run for run in runs if run.posterior == posterior]
        cells = [posterior, str(len(own)), f"{max(run.standard_error for run in own):.3f}"]
        for score, (_, shown) in COLUMNS.items():
            values = torch.tensor([getattr(run, score) for run in own], dtype=torch.float64)
            spread = " ± " + shown.format((values.max() - values.min()).item() / 2) if len(own) > 1 else ""
            cells.append(shown.format(values.mean().item()) + spread)
        rows.append(cells)
    return rows


def run_vae(posteriors, seeds, epochs, out, say, progress=False):
    """The ``vi-flows vae`` job: fit the digits VAE with each of ``posteriors`` (names of
    :data:`POSTERIORS` or flow specs) for each seed, hand the table's lines to ``say``, and write
    ``table.md``, ``reconstructions.png``, ``prior_samples.png`` and ``elbo_per_epoch.png`` (the first
    seed's fits) to the folder ``out``. Returns the :class:`VAERun` list."""
    runs = []
    for seed in seeds:
        for posterior in posteriors:
            run = fit_vae(posterior, seed=seed, epochs=epochs, progress=progress)
            say(f"{posterior} (seed {seed}): test log-likelihood {run.log_likelihood:.2f} nats per image, ELBO {run.elbo:.2f}")
            runs.append(run)
    rows = summary_rows(runs)
    say(plain_text(rows))
    (out / "table.md").write_text(markdown(rows))
    first = [run for run in runs if run.seed == seeds[0]]
    images, _ = reconstructions(first[0])
    plots.image_rows({"test images": images, **{run.posterior: reconstructions(run)[1] for run in first}}, out / "reconstructions.png", "Test images and their reconstructions (one posterior draw each)")
    plots.image_rows({run.posterior: prior_samples(run) for run in first}, out / "prior_samples.png", "Decoded draws from the prior (pixel probabilities)")
    plots.curves({run.posterior: epoch_elbos(run.result) for run in first}, out / "elbo_per_epoch.png", "epoch", "training ELBO (nats per image)", "ELBO per epoch")
    say(f"wrote table.md, reconstructions.png, prior_samples.png, elbo_per_epoch.png to {out}/")
    return runs
