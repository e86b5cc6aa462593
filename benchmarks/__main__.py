"""`python -m benchmarks run ...` / `python -m benchmarks table results.jsonl`: see benchmarks/run.py."""
import sys

from benchmarks.run import main

sys.exit(main())
