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


def build_parser():
    parser = argparse.ArgumentParser(prog="vi-flows", description="Normalizing-flow variational inference for Pyro.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("flows", help="list the registered flows").set_defaults(run=_list_flows)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
