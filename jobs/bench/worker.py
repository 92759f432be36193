"""`python -m jobs.bench.worker module:function JSON`: one measurement in a fresh process (see
`jobs.bench.harness.probe`); prints the function's result as the last line of stdout. Nothing imports this
module, so running it with -m is clean."""

from __future__ import annotations

import importlib
import json
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 2 or ":" not in argv[0] or not argv[0].startswith("jobs.bench."):
        print("usage: python -m jobs.bench.worker jobs.bench.MODULE:FUNCTION JSON", file=sys.stderr)
        return 2
    module, name = argv[0].split(":")
    fn = getattr(importlib.import_module(module), name)
    print(json.dumps(fn(**json.loads(argv[1]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
