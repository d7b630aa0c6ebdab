"""Superseded by ``mocov3 bench`` (mocov3/bench.py); kept so old command lines still work.

Usage: python benchmarks/step_throughput.py [mocov3 bench arguments], e.g.
       python benchmarks/step_throughput.py --config configs/demo.yaml --steps 5 --json
"""

from __future__ import annotations

import sys

from mocov3.bench import main

if __name__ == "__main__":
    sys.exit(main())
