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


def test_every_data_file_under_fastsd_is_package_data():
    """Files the code reads at run time (assets, the server's static files, the native kernel's C++ source)
    ship in a non-editable install too."""
    import fnmatch

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
    missing = []
    for root, dirs, files in os.walk(os.path.join(REPO, "fastsd")):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        for name in files:
            if name.endswith((".py", ".pyc")):
                continue
            rel = os.path.relpath(os.path.join(root, name), os.path.join(REPO, "fastsd"))
            parts = rel.split(os.sep)
            # the deepest package holding the file, and the file's path relative to it
            for depth in range(len(parts) - 1, -1, -1):
                pkg = ".".join(["fastsd", *parts[:depth]])
                if os.path.exists(os.path.join(REPO, "fastsd", *parts[:depth], "__init__.py")):
                    break
            sub = "/".join(parts[depth:])
            if not any(fnmatch.fnmatch(sub, g) for g in data.get(pkg, [])):
                missing.append(rel)
    assert not missing, missing
