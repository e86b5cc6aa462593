"""`python -m fastsd.benchmarks run` with the inputs users get wrong: each mistake is argparse's error exit (status 2,
one `python -m fastsd.benchmarks: error:` line, no traceback), found before any worker starts and before anything
is written; a relative --model path reaches the workers (which run in the checkout) as an absolute one."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROG = "python -m fastsd.benchmarks"
# random:tiny, the cheapest suite, tiny sizes: a run that does start is short
SMALL = ["--model", "random:tiny", "--suite", "clip", "--device", "cpu", "--dtype", "fp32", "--res", "64", "--steps",
         "2", "--warmup", "0", "--repeat", "1", "--threads", "1", "--no-memory-runs"]


def _bench(*args, cwd=ROOT, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # tests/conftest.py sets it
    return subprocess.run([sys.executable, "-m", "fastsd.benchmarks", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def _one_usage_error(p, *words):
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert len(err) == 1 and err[0].startswith(f"{PROG}: error: "), err
    assert "Traceback" not in p.stderr and p.stdout == "", (p.stdout, p.stderr)
    for w in words:
        assert w in err[0], err
    return err[0]


@pytest.mark.parametrize("args, words", [
    (["--res", "60"], ["--res 60", "multiples of 8"]),
    (["--steps", "0"], ["--steps must be at least 1"]),
    (["--threads", "0"], ["--threads must be at least 1"]),
    (["--repeat", "0"], ["--repeat must be at least 1"]),
    (["--timeout", "0"], ["--timeout must be a positive number"]),
    (["--suite", "nope"], ["unknown suite 'nope'"]),
    (["--suite", ","], ["--suite ','", "names nothing"]),
    (["--res", ","], ["--res ','", "names nothing"]),
    (["--dtype", " , "], ["--dtype", "names nothing"]),
    (["--device", "tpu"], ["--device tpu", "choose cpu or cuda"]),
])
def test_usage_errors_exit_2_with_one_line_and_write_nothing(tmp_path, args, words):
    out = tmp_path / "out"
    p = _bench("run", *SMALL, *args, "--json", str(out / "r.jsonl"), "--plot", str(tmp_path / "p.png"))
    _one_usage_error(p, *words)
    assert os.listdir(tmp_path) == []  # no results folder, file or plot


def test_json_that_is_a_folder_is_refused_before_the_run(tmp_path):
    (tmp_path / "results.jsonl").mkdir()
    p = _bench("run", *SMALL, "--json", str(tmp_path / "results.jsonl"))
    _one_usage_error(p, f"--json {tmp_path / 'results.jsonl'}", "is a folder")
    assert "rows appended" not in p.stderr and os.listdir(tmp_path / "results.jsonl") == []


def test_json_under_a_file_is_refused_before_the_run(tmp_path):
    (tmp_path / "f").write_text("x")
    p = _bench("run", *SMALL, "--json", str(tmp_path / "f" / "sub" / "r.jsonl"))
    _one_usage_error(p, "is not a folder")
    assert (tmp_path / "f").read_text() == "x"


def test_plot_into_a_missing_folder_is_refused_before_the_run(tmp_path):
    p = _bench("run", *SMALL, "--json", str(tmp_path / "r.jsonl"), "--plot", str(tmp_path / "missing" / "p.png"))
    _one_usage_error(p, "--plot", "no such folder")
    assert os.listdir(tmp_path) == []  # the results file was not started either
    (tmp_path / "r.jsonl").write_text("")
    p = _bench("table", str(tmp_path / "r.jsonl"), "--plot", str(tmp_path / "missing" / "p.png"))
    _one_usage_error(p, "--plot", "no such folder")


def test_a_model_that_is_not_a_file_or_folder_is_refused(tmp_path):
    fifo = tmp_path / "m.safetensors"
    os.mkfifo(fifo)
    p = _bench("run", *SMALL, "--model", str(fifo), "--json", str(tmp_path / "r.jsonl"), timeout=120)
    _one_usage_error(p, str(fifo), "not a checkpoint file or model folder")
    p = _bench("run", *SMALL, "--model", "missing.safetensors", "--json", str(tmp_path / "r.jsonl"), cwd=tmp_path)
    _one_usage_error(p, "missing.safetensors: no such file or folder")
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_a_relative_model_path_reaches_the_workers(tmp_path):
    """The workers run in the checkout: a checkpoint named relative to the user's working folder is made absolute
    before they start (it used to be a row per worker with 'no such file or folder')."""
    import safetensors.torch

    import fastsd
    from fastsd.checkpoint import ldm_state_dict

    pipe = fastsd.load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")
    (tmp_path / "models").mkdir()
    safetensors.torch.save_file(ldm_state_dict(pipe), str(tmp_path / "models" / "tiny.safetensors"))
    small = [x if x != "random:tiny" else os.path.join("models", "tiny.safetensors") for x in SMALL]
    p = _bench("run", *small, "--json", "r.jsonl", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert rows and all(r["status"] == "ok" for r in rows), [(r["status"], r.get("reason")) for r in rows]
    assert {r["model"] for r in rows} == {str(tmp_path / "models" / "tiny.safetensors")}
