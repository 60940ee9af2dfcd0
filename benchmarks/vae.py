"""The digits VAE with every amortised posterior of van den Berg et al. (2018), Table 1, over seeds,
and its time per epoch against a hand-written Pyro VAE (Pyro's own VAE example, here with the same
networks) in the same run.

    python benchmarks/vae.py table [epochs] [seed ...]   # default 400 epochs, seeds 0 1 2
    python benchmarks/vae.py peer [epochs]               # seconds per epoch (default 200), alternating

One thread, nothing else running: the times are per epoch of 15 steps of 100 images.
"""

import sys
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from torch import nn

from vi_flows.autoflow.pseudo_observations import HIDDEN
from vi_flows.models import vae_digits
from vi_flows.report import markdown
from vi_flows.vae import LR, POSTERIORS, fit_vae, steps_per_epoch, summary_rows


def table(epochs=400, seeds=(0, 1, 2)):
    runs = []
    for seed in seeds:
        for posterior in POSTERIORS:
            run = fit_vae(posterior, seed=seed, epochs=epochs)
            runs.append(run)
            print(f"{posterior} seed {seed}: test log-lik {run.log_likelihood:.3f} ± {run.standard_error:.3f}, ELBO {run.elbo:.3f}, "
                  f"KL {run.kl:.3f}, {run.seconds_per_epoch:.3f} s/epoch, compile {run.result.compile_seconds:.1f} s, "
                  f"rollbacks {len(run.result.rollbacks)}", flush=True)
    print(markdown(summary_rows(runs)))


class Encoder(nn.Module):
    """A Gaussian encoder of the sizes AutoFlow's amortised one has (one hidden layer of HIDDEN)."""

    def __init__(self, latent_dim, pixels=64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(pixels, HIDDEN), nn.ELU(), nn.Linear(HIDDEN, 2 * latent_dim))

    def forward(self, images):
        loc, log_scale = self.net(images).chunk(2, -1)
        return loc, log_scale.exp()


def hand_written_epoch_seconds(epochs, seed=0):
    """Pyro's VAE example on the same model: an encoder network in a hand-written guide, SVI with
    Trace_ELBO and Adam; seconds per epoch."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    vae, encoder = vae_digits.DigitsVAE(), Encoder(vae_digits.LATENT_DIM)
    images = vae_digits.train_images()

    def guide(images=images, batch_size=vae_digits.BATCH_SIZE):
        pyro.module("encoder", encoder)
        with pyro.plate("images", len(images), subsample_size=batch_size) as index:
            loc, scale = encoder(images[index])
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    svi = SVI(vae, guide, Adam({"lr": LR}), Trace_ELBO())
    start = time.perf_counter()
    for _ in range(epochs * steps_per_epoch()):
        svi.step()
    return (time.perf_counter() - start) / epochs


def peer(epochs=200):
    for repeat in range(3):
        hand = hand_written_epoch_seconds(epochs, seed=repeat)
        line = f"repeat {repeat}: hand-written Pyro VAE {hand:.4f} s/epoch"
        for compile in (False, True):
            ours = fit_vae("gaussian", seed=repeat, epochs=epochs, test_draws=10, compile=compile).seconds_per_epoch
            line += f"; AutoFlow fit (compile={compile}) {ours:.4f} s/epoch, {ours / hand:.2f}x"
        print(line, flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    command, numbers = sys.argv[1], [int(value) for value in sys.argv[2:]]
    if command == "table":
        table(*numbers[:1], *([tuple(numbers[1:])] if len(numbers) > 1 else []))
    elif command == "peer":
        peer(*numbers[:1])
    else:
        raise SystemExit(__doc__)
