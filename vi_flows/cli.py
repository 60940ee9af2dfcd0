"""The ``vi-flows`` command line. Every argument is checked before any work: bad input is one line
on stderr and exit status 2; a run in which every guide failed, or the model raised, exits 1."""

import argparse
import functools
import os
import sys
import traceback
from pathlib import Path

DEFAULT_OUT = "vi-flows-compare"
GAUSSIANS = ("meanfield", "fullrank")


def _list_flows(args):
    from .registry import available_flows, flow_aliases

    flows = available_flows()
    width = max(map(len, flows))
    for name, description in flows.items():
        print(f"{name:<{width}}  {description}")
    for alias, name in flow_aliases().items():
        print(f"{alias:<{width}}  alias of {name}")
    return 0


def _list_models(args):
    from .zoo import list_models

    zoo = list_models()
    width = max(map(len, zoo))
    for name, description in zoo.items():
        print(f"{name:<{width}}  {description}")
    return 0


def _checked_out(out):
    """The output folder, made if need be; ``ValueError`` where it cannot be written."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out!r} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--out {out!r} cannot be made ({error.strerror})") from error
    if not os.access(path, os.W_OK):
        raise ValueError(f"--out {out!r} is not writable")
    return path


def _check_guides(guides):
    from .registry import parse_spec

    for name in guides:
        if name not in GAUSSIANS:
            try:
                parse_spec(name)
            except ValueError as error:
                raise ValueError(f"--guides {name!r}: {error}") from error


def _where(error):
    """Where in the user's code (not Pyro's or torch's) an exception was raised."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if "site-packages" not in frame.filename]
    frames = [frame for frame in frames if f"{os.sep}vi_flows{os.sep}" not in frame.filename] or frames
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _compare(args):
    from .compare import DEFAULT_GUIDES
    from .messages import first_line
    from .zoo import load_model

    guides = args.guides or list(DEFAULT_GUIDES)
    try:
        source = load_model(args.model)
        _check_guides(guides)
        out = _checked_out(args.out)
    except ValueError as error:
        print(f"vi-flows compare: {error}", file=sys.stderr)
        return 2
    from .report import run_compare

    try:
        options = dict(num_steps=args.steps, out=out, quiet=args.quiet, wide=args.wide, parameters=args.parameters)
        result = run_compare(args.model, source, guides, functools.partial(print, flush=True), **options)
    except Exception as error:  # the model raised: one line and where, not a traceback through Pyro
        print(f"vi-flows compare: the model failed: {first_line(error)}{_where(error)}", file=sys.stderr)
        return 1
    if not result.guides:
        print("vi-flows compare: every guide failed (see the table)", file=sys.stderr)
        return 1
    return 0


def _vae(args):
    from .vae import POSTERIORS

    posteriors = args.posteriors or list(POSTERIORS)
    try:
        _check_guides([name for name in posteriors if name not in POSTERIORS])
        out = _checked_out(args.out)
    except ValueError as error:
        print(f"vi-flows vae: {error}", file=sys.stderr)
        return 2
    from .vae import run_vae

    run_vae(posteriors, args.seeds, args.epochs, out, functools.partial(print, flush=True), progress=not args.quiet)
    return 0


def _fit(args):
    from .zoo import load_model

    try:
        source = load_model(args.model)
        _check_guides([args.flow] if args.flow else [])
        out = _checked_out(args.out)
    except ValueError as error:
        print(f"vi-flows fit: {error}", file=sys.stderr)
        return 2
    from .report import run_fit

    try:
        run_fit(source.model, args.flow, args.local, out, functools.partial(print, flush=True), num_steps=args.steps, seed=args.seed, progress=not args.quiet)
    except Exception as error:  # the model raised: one line and where
        from .messages import first_line

        print(f"vi-flows fit: the fit failed: {first_line(error)}{_where(error)}", file=sys.stderr)
        return 1
    return 0


def _positive(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(prog="vi-flows", description="Normalizing-flow variational inference for Pyro.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("flows", help="list the registered flows").set_defaults(run=_list_flows)
    commands.add_parser("models", help="list the bundled models").set_defaults(run=_list_models)
    compare = commands.add_parser("compare", help="fit guides to a model and compare them with a reference posterior")
    compare.add_argument("model", nargs="?", default="funnel", help="a bundled model or path/to/file.py:function (default: funnel)")
    compare.add_argument("--guides", nargs="+", help="meanfield, fullrank or flow specs (default: meanfield fullrank and the default flow)")
    compare.add_argument("--steps", type=_positive, help="SVI steps per guide (default: until fit's stopping rule)")
    compare.add_argument("--out", default=DEFAULT_OUT, help=f"folder for the table and plots (default: {DEFAULT_OUT})")
    compare.add_argument("--quiet", action="store_true", help="no progress bars")
    compare.add_argument("--wide", action="store_true", help="print every column of the table, not the ones that fit 100 characters")
    compare.add_argument("--parameters", nargs="+", help="the marginals' panels, e.g. tau 'theta[0]' (default: the first 12)")
    compare.set_defaults(run=_compare)
    fitting = commands.add_parser("fit", help="fit AutoFlow to a model and save the guide (data-parallel under torchrun)")
    fitting.add_argument("model", help="a bundled model or path/to/file.py:function")
    fitting.add_argument("--flow", help="the global flow's spec (default: AutoFlow's)")
    fitting.add_argument("--local", default="auto", choices=["auto", "per-item", "amortized", "none"], help="local latents' posteriors (default: auto)")
    fitting.add_argument("--steps", type=_positive, help="SVI steps (default: until fit's stopping rule)")
    fitting.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    fitting.add_argument("--out", default="vi-flows-fit", help="folder for guide.pt (default: vi-flows-fit)")
    fitting.add_argument("--quiet", action="store_true", help="no progress bar")
    fitting.set_defaults(run=_fit)
    vae = commands.add_parser("vae", help="fit the bundled digits VAE with amortised flow posteriors and score them on held-out images")
    vae.add_argument("--posteriors", nargs="+", help="gaussian, planar, iaf, sylvester-orthogonal, -householder, -triangular or flow specs (default: all six)")
    vae.add_argument("--epochs", type=_positive, default=400, help="passes over the 1500 training images (default: 400)")
    vae.add_argument("--seeds", type=int, nargs="+", default=[0], help="one fit per posterior and seed (default: 0)")
    vae.add_argument("--out", default="vi-flows-vae", help="folder for the table and plots (default: vi-flows-vae)")
    vae.add_argument("--quiet", action="store_true", help="no progress bars")
    vae.set_defaults(run=_vae)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
