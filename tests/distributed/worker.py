"""Every suite's flows in one job, so the test pays for starting two ranks (and importing torch
and transformers in each) once per bufferfix mode instead of once per suite.

Run: torchrun --nproc_per_node 2 tests/distributed/worker.py --out DIR
         [--suites torch_fsdp,accelerate_fsdp,transformers_native,lightning_fabric] [--only flow,flow]
Each suite is also a worker of its own: torchrun --nproc_per_node 2 tests/distributed/SUITE.py --out DIR
"""
import argparse
import importlib

import _harness as h  # first: imports bufferfix before torch

SUITES = ("torch_fsdp", "accelerate_fsdp", "transformers_native", "lightning_fabric")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--suites", default=",".join(SUITES))
    args, _ = parser.parse_known_args()
    flows = {}
    for suite in args.suites.split(","):
        flows.update(importlib.import_module(suite).FLOWS)
    h.main(flows, __doc__)
