import atexit
import os
import shutil
import tempfile

import pytest

from fastsd.benchmarks.common import checkout_off_path

# `python -m pytest` in the checkout puts it on sys.path; fastsd is installed (README), so it comes off
checkout_off_path()

# Triton kernels run on CPU tensors only under the interpreter, which must be switched on before
# triton is first imported. No test here has a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The CPU path's measured choices (fastsd/cpu_tune.py): tests take each piece's default unless a test
# turns measuring on, and never touch the user's cache.
os.environ.setdefault("FASTSD_CPU_TUNE", "0")
if "FASTSD_CACHE_DIR" not in os.environ:
    os.environ["FASTSD_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastsd-test-cache-")
    atexit.register(shutil.rmtree, os.environ["FASTSD_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium under Playwright for the page's tests (tests/test_serve_browser*.py, which skip without it)."""
    from test_serve_browser import CHROMIUM, FLAGS, sync_api

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    """A page in a fresh browser context each test: its own localStorage, so no test sees another's kept gallery."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        yield context.new_page()
    finally:
        context.close()
