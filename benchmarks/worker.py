"""One benchmark configuration in a fresh process (so peak RSS belongs to it alone).

    python -m fastsd.benchmarks.worker '<spec as JSON>'

Prints one line per result row: the ROW_PREFIX, then the row as JSON. Started by benchmarks/run.py.
"""
from __future__ import annotations

import json
import os
import sys

ROW_PREFIX = "@@benchmark-row "


def main(argv: list[str] | None = None) -> int:
    spec = json.loads((argv if argv is not None else sys.argv[1:])[0])
    from . import common

    common.checkout_off_path()  # the worker runs in the checkout (run.py); before anything imports transformers
    import torch

    from . import suites

    import fastsd  # noqa: F401  (imports before the RSS baseline is read)

    if {"diffusers", "openvino-diffusers"} & set(spec.get("impls", ())):
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    run_wide = {"device": spec["device"], "device_name": common.device_name(spec["device"]),
                "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), **common.versions(),
                **common.isa_fields()}
    for row in suites.run(spec):
        row = {**run_wide, **row}
        print(ROW_PREFIX + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
