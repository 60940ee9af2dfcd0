"""The ``vi-flows`` command line."""

import argparse
import sys

from .registry import available_flows, flow_aliases


def _list_flows(args):
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


def _compare(args):
    from .compare import DEFAULT_GUIDES
    from .report import run_compare

    try:
        run_compare(args.model, guides=args.guides or DEFAULT_GUIDES, num_steps=args.steps, out=args.out, quiet=args.quiet)
    except ValueError as error:
        print(f"vi-flows compare: {error}", file=sys.stderr)
        return 2
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="vi-flows", description="Normalizing-flow variational inference for Pyro.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("flows", help="list the registered flows").set_defaults(run=_list_flows)
    commands.add_parser("models", help="list the bundled models").set_defaults(run=_list_models)
    compare = commands.add_parser("compare", help="fit guides to a model and compare them with a reference posterior")
    compare.add_argument("model", nargs="?", default="funnel", help="a bundled model or path/to/file.py:function (default: funnel)")
    compare.add_argument("--guides", nargs="+", help="meanfield, fullrank or flow specs (default: meanfield fullrank and the default flow)")
    compare.add_argument("--steps", type=int, help="SVI steps per guide (default: until fit's stopping rule)")
    compare.add_argument("--out", default="vi-flows-compare", help="folder for the table and plots (default: vi-flows-compare)")
    compare.add_argument("--quiet", action="store_true", help="no progress bars")
    compare.set_defaults(run=_compare)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
