"""The ``nnunet-semiseg`` command. Each sub-command lives in its own module, which exposes
``add_parser(subparsers)`` (registering the sub-command and ``set_defaults(func=...)``); those modules keep
heavy imports (torch, nnunetv2) inside their functions so that ``nnunet-semiseg --help`` stays fast."""
import argparse
import importlib
import sys

# sub-command -> module providing add_parser(subparsers)
COMMANDS = {
    'demo': 'nnunet_semiseg.demo',
    'preprocess-unlabeled': 'nnunet_semiseg.unlabeled.preprocess',
    'export': 'nnunet_semiseg.export',
    'convert': 'nnunet_semiseg.conversion.cli',
    'split': 'nnunet_semiseg.conversion.split',
    'evaluate': 'nnunet_semiseg.evaluation',
    'trainers-dir': 'nnunet_semiseg.discovery',
    'env': 'nnunet_semiseg.discovery',
    'benchmark': 'nnunet_semiseg.benchmark',
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='nnunet-semiseg',
        description='Semi-supervised, contrastive training for nnU-Net v2 (Mean Teacher, MONA, ARCO, ACTION, ACTION++).')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    done = set()
    for module_name in dict.fromkeys(COMMANDS.values()):
        if module_name in done:
            continue
        done.add(module_name)
        importlib.import_module(module_name).add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, 'func', None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == '__main__':
    sys.exit(main())
