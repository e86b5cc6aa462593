"""fastsd.batch on a local 2-CPU Ray cluster (one per module: Ray takes a while to start on 2 cores): the
same PNGs and manifest as a local run (a hires job with an upscaler model from --upscaler-dir too), and every job
done exactly once when an actor is SIGKILLed."""
import json
import os
import signal
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from fastsd.batch import Defaults, run  # noqa: E402

SMALL = Defaults(steps=2, width=64, height=64)
STRIP = ("seconds", "finished")


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def rows_by_id(folder):
    with open(os.path.join(folder, "manifest.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows, {r["id"]: {k: v for k, v in r.items() if k not in STRIP} for r in rows}


def pngs(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in os.listdir(folder) if n.endswith(".png")}


def test_ray_run_matches_the_local_run(cluster, tmp_path):
    from test_batch import write_tiny_upscaler

    (tmp_path / "upscalers").mkdir()
    upscalers = os.path.dirname(write_tiny_upscaler(tmp_path / "upscalers" / "4x-Tiny.safetensors"))
    jobs = [{"prompt": f"a cat number {i}", "seed": i} for i in range(4)] + [{"prompt": 3}] + [
        {"prompt": "an owl", "seed": 5, "hires_scale": 1.25, "hires_upscaler": "4x-Tiny"}]
    local, remote = str(tmp_path / "local"), str(tmp_path / "ray")
    run(jobs, model="random:tiny", out=local, defaults=SMALL, threads=1, progress=False, upscaler_dir=upscalers)
    out = run(jobs, model="random:tiny", out=remote, defaults=SMALL, ray="auto", workers=2, cpus_per_worker=1,
              progress=False, upscaler_dir=upscalers)
    assert [r["status"] for r in out] == ["done"] * 4 + ["failed", "done"]
    assert out[4]["error"] == "prompt must be a string, got int" and out[4]["line"] == 5
    assert pngs(local) == pngs(remote) and len(pngs(local)) == 5  # byte for byte (1 thread per process in both)
    assert rows_by_id(local)[1] == rows_by_id(remote)[1]


def _actor_pids(title):
    """Pids of the actor processes whose title (Ray sets `ray::Class.method` while a call runs, so a starting
    actor reads `ray::BatchWorker.__init__`) starts with `title`."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(title):
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def test_killed_actor_its_jobs_run_elsewhere_each_once(cluster, tmp_path, capsys):
    n = 10
    out = str(tmp_path / "out")
    killed = []

    def kill_one_after_the_first_image():
        path = os.path.join(out, "manifest.jsonl")
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if os.path.exists(path) and '"done"' in open(path).read():
                pids = _actor_pids(b"ray::BatchWorker.run")  # one at work, not one still starting
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_one_after_the_first_image, daemon=True)
    watcher.start()
    rows = run([{"prompt": f"a dog {i}", "seed": i} for i in range(n)], model="random:tiny", out=out,
               defaults=Defaults(steps=8, width=64, height=64), ray="auto", workers=2, progress=False)
    watcher.join(timeout=5)
    assert killed, "no actor was killed: the run ended first"
    assert "a Ray worker died" in capsys.readouterr().err
    all_rows, _ = rows_by_id(out)
    done = [r["id"] for r in all_rows if r["status"] == "done"]
    assert len(done) == len(set(done)) == n and [r["status"] for r in rows] == ["done"] * n
    assert sorted(pngs(out)) == sorted(f"{i}.png" for i in done)


def test_no_room_is_one_line_and_relative_paths_reach_the_workers(cluster, tmp_path, monkeypatch):
    """A worker the whole cluster can't hold is refused up front (Ray would wait for ever), and folders and files
    given relative to this process' folder (options, and a job's LoRA and upscaler files) reach workers whose folder
    is another (the cluster's) as absolute paths."""
    from test_batch import write_tiny_upscaler

    with pytest.raises(ValueError, match="no room for one worker of --cpus-per-worker 3"):
        run(["a cat"], model="random:tiny", out=str(tmp_path / "none"), defaults=SMALL, ray="auto",
            cpus_per_worker=3, progress=False)
    assert not (tmp_path / "none").exists()
    import safetensors.torch
    import torch
    from PIL import Image

    from fastsd.config import TINY
    from fastsd.models.vae import AutoencoderKL

    (tmp_path / "ups").mkdir()
    write_tiny_upscaler(tmp_path / "ups" / "4x-Tiny.safetensors")
    (tmp_path / "emb").mkdir()  # (and --embeddings-dir, --vae: added with them)
    safetensors.torch.save_file({"emb_params": torch.ones(1, TINY.clip.hidden_size)}, str(tmp_path / "emb" / "owlish"
                                                                                          ".safetensors"))
    safetensors.torch.save_file({k: v.contiguous() for k, v in AutoencoderKL(TINY.vae).state_dict().items()},
                                str(tmp_path / "myvae.safetensors"))
    monkeypatch.chdir(tmp_path)  # (the cluster's workers started in the folder before)
    import fastsd
    from fastsd.testing_lora import write_random_lora

    write_random_lora("ups/ink.safetensors", fastsd.load_pipeline("random:tiny"), fmt="kohya_ldm", rank=4, seed=1)
    jobs = [{"prompt": "an owlish owl", "seed": 5, "hires_scale": 1.25, "hires_upscaler": "4x-Tiny"},
            {"prompt": "a cat", "seed": 6, "hires_scale": 1.25, "hires_upscaler": "ups/4x-Tiny.safetensors",
             "loras": ["ups/ink.safetensors:0.5"]}]  # (job files relative to this folder: failed on the workers)
    out = run(jobs, model="random:tiny", out="rel", defaults=SMALL, ray="auto", workers=1, progress=False,
              upscaler_dir="ups", embeddings_dir="emb", vae="myvae.safetensors")
    assert [r["status"] for r in out] == ["done", "done"], out
    assert out[1]["settings"]["loras"] == ["ups/ink.safetensors:0.5"]  # (the manifest keeps the job as written)
    with Image.open(tmp_path / "rel" / out[0]["file"]) as im:
        assert 'TI hashes: "owlish: ' in im.text["parameters"] and "VAE: myvae" in im.text["parameters"]
