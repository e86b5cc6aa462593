"""Packaging: every package under fastsd/ (and the kernels/ and benchmarks/ folders under their fastsd.* names)
is listed in pyproject.toml, so a non-editable install has them all; no top-level name but fastsd is claimed."""
import os
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_package_is_installed_under_fastsd():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        cfg = tomllib.load(f)["tool"]["setuptools"]
    listed, mapping = set(cfg["packages"]), cfg["package-dir"]
    found = set()
    for root, dirs, files in os.walk(os.path.join(REPO, "fastsd")):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        if "__init__.py" in files:
            found.add(os.path.relpath(root, REPO).replace(os.sep, "."))
    found |= {"fastsd.kernels", "fastsd.benchmarks"}
    assert found <= listed, sorted(found - listed)
    assert {p.split(".")[0] for p in listed} == {"fastsd"}
    assert mapping == {"fastsd.kernels": "kernels", "fastsd.benchmarks": "benchmarks"}
