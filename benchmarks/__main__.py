"""`python -m fastsd.benchmarks run ...` / `python -m fastsd.benchmarks table results.jsonl`: see benchmarks/run.py."""
import sys

from .run import main

sys.exit(main())
