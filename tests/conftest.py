import os
import sys
import tempfile
from pathlib import Path

# `python -m pytest` in the checkout puts the checkout on sys.path, where kernels/ and benchmarks/ (installed as
# fastsd.kernels / fastsd.benchmarks) shadow PyPI's `kernels` (imported by transformers and diffusers) and
# `benchmarks`. fastsd is installed (README), so the checkout itself comes off the path.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != ROOT]

# Triton kernels run on CPU tensors only under the interpreter, which must be switched on before
# triton is first imported. No test here has a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The CPU path's measured choices (fastsd/cpu_tune.py): tests take each piece's default unless a test
# turns measuring on, and never touch the user's cache.
os.environ.setdefault("FASTSD_CPU_TUNE", "0")
os.environ.setdefault("FASTSD_CACHE_DIR", tempfile.mkdtemp(prefix="fastsd-test-cache-"))
