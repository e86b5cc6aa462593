import os

# Triton kernels run on CPU tensors only under the interpreter, which must be switched on before
# triton is first imported. No test here has a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
