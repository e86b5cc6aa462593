"""The torch references the kernels are held against, imported in ONE place: when the references move, only
this line changes."""
from fastsd.backends.reference import attention, cfg_step, group_norm  # noqa: F401
