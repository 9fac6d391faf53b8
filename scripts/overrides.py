"""Print a YAML overlay of params as `-S section.key=value` arguments for `dvc exp run`."""

import argparse
import json
import shlex

import yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("overlay")
    args = ap.parse_args()
    with open(args.overlay) as f:
        overlay = yaml.safe_load(f)
    out = []
    for section, values in overlay.items():
        for key, value in values.items():
            # JSON is valid YAML and keeps null, booleans and lists unambiguous for DVC's parser.
            out += ["-S", f"{section}.{key}={json.dumps(value)}"]
    print(" ".join(shlex.quote(a) for a in out))


if __name__ == "__main__":
    main()
