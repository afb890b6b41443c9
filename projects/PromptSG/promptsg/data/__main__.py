"""Rewrite generated synthetic datasets explicitly: ``python -m promptsg.data --regenerate DIR [DIR ...]``.

A folder is otherwise generated only when it is missing (``promptsg.data.synthetic``). This
rewrites each DIR (a SyntheticMarket split or a caption pool) with the parameters of its own
manifest and this code's generator version; every file in it is replaced, added files included.
"""
import argparse
import sys

import promptsg  # noqa: F401  (FastReID patched before the dataset module imports it)
from promptsg.data.synthetic import regenerate_dataset


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m promptsg.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regenerate", nargs="+", metavar="DIR", required=True,
                        help="generated dataset folders to write afresh")
    args = parser.parse_args(argv)
    for folder in args.regenerate:
        try:
            manifest = regenerate_dataset(folder)
        except (OSError, ValueError) as exc:
            sys.exit(f"error: {folder}: {exc}")
        print(f"{folder}: regenerated ({', '.join(f'{k} {v}' for k, v in manifest['counts'].items())})")


if __name__ == "__main__":
    main()
