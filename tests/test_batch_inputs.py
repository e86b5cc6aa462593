"""fastsd.batch inputs a user hit in a second bug hunt (notes/s35/batch_hunt/REPORT.md): ids, job files, options."""
import os

import pytest
import safetensors.torch
import torch
from PIL import Image

from fastsd.batch import Defaults
from fastsd.batch.__main__ import main
from fastsd.batch.jobs import BadJob, Job, read_job_file
from fastsd.batch.runner import load_jobs

SMALL = Defaults(steps=1, width=64, height=64)


def test_ids_differing_only_in_case_are_duplicates_and_integer_ids_name_files():
    """'Cat' and 'cat' are one file on macOS / Windows: the second PNG replaced the first, both rows "done". An
    integer id (as pandas writes) names its PNG, and is a duplicate of the same id as text."""
    jobs = load_jobs([{"prompt": "a", "id": "Cat"}, {"prompt": "b", "id": "cat"}, {"prompt": "c", "id": 5},
                      {"prompt": "d", "id": "5"}, {"prompt": "e", "id": True}, {"prompt": "f", "id": -1}], SMALL)
    assert isinstance(jobs[0], Job) and isinstance(jobs[1], BadJob)
    assert jobs[1].error == "duplicate id 'cat' (first on line 1 as 'Cat': one file on a case-insensitive file system)"
    assert isinstance(jobs[2], Job) and (jobs[2].id, jobs[2].file) == ("5", "5.png")
    assert jobs[3].error == "duplicate id '5' (first on line 3)"
    assert [type(j) for j in jobs[4:]] == [BadJob, BadJob] and jobs[4].error.startswith("id True must be")


@pytest.mark.parametrize("option", [["--workers", "2"], ["--cpus-per-worker", "2"], ["--gpus-per-worker", "0"]])
def test_ray_worker_options_without_ray_are_usage_errors(option, tmp_path, capsys):
    """--workers 2 without --ray ran one worker in this process, exit 0, nothing said."""
    jobs = tmp_path / "j.txt"
    jobs.write_text("a cat\n")
    out = tmp_path / "out"
    assert main([str(jobs), "--model", "random:tiny", "--out", str(out), *option]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {option[0]} is for Ray workers: add --ray (a cluster on this machine) or --ray ADDRESS"]
    assert not out.exists()
    from fastsd.batch import run

    with pytest.raises(ValueError, match="^workers is for Ray workers"):
        run([{"prompt": "a cat"}], model="random:tiny", out=str(out), workers=2)


def test_embeddings_dir_from_the_environment_and_vae_are_generates(tmp_path, capsys, monkeypatch):
    """$FASTSD_EMBEDDINGS_DIR was read by python -m fastsd.generate and ignored by fastsd.batch (a prompt naming an
    embedding gave another image than generate's, the README's promise); fastsd.batch had no --vae / --embeddings-dir.
    Now a job's PNG is generate's, bytes and infotext (TI hashes, VAE); an embedding that can't be read fails its job
    alone; a missing VAE or embeddings folder is a usage error."""
    from fastsd.config import TINY
    from fastsd.generate import main as generate
    from fastsd.models.vae import AutoencoderKL

    emb = tmp_path / "emb"
    emb.mkdir()
    width = TINY.clip.hidden_size
    safetensors.torch.save_file({"emb_params": torch.randn(2, width, generator=torch.Generator().manual_seed(1))},
                                str(emb / "mystyle.safetensors"))
    safetensors.torch.save_file({"emb_params": torch.zeros(1, width + 8)}, str(emb / "wrongwidth.safetensors"))
    torch.manual_seed(5)
    vae = tmp_path / "vae.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in AutoencoderKL(TINY.vae).state_dict().items()}, str(vae))
    monkeypatch.setenv("FASTSD_EMBEDDINGS_DIR", str(emb))
    jobs = tmp_path / "j.jsonl"
    jobs.write_text('{"id": "e", "prompt": "a photo of mystyle", "seed": 3}\n'
                    '{"id": "bad", "prompt": "a wrongwidth cat", "seed": 3}\n'
                    '{"id": "p", "prompt": "a cat", "seed": 4}\n')
    size = ["--steps", "1", "--width", "64", "--height", "64", "--threads", "1", "--no-progress"]
    out = tmp_path / "out"
    assert main([str(jobs), "--model", "random:tiny", "--out", str(out), "--vae", str(vae), *size]) == 1
    err = capsys.readouterr().err
    assert "job bad (line 2) failed: " in err and "wrongwidth" in err and "Traceback" not in err
    assert sorted(os.listdir(out)) == [".fastsd-batch.lock", "e.png", "manifest.jsonl", "p.png"]
    assert generate(["a photo of mystyle", "--model", "random:tiny", "--vae", str(vae), "--seed", "3", *size,
                     "--out", str(tmp_path / "g.png")]) == 0
    assert (out / "e.png").read_bytes() == (tmp_path / "g.png").read_bytes()
    with Image.open(out / "e.png") as im:
        assert "TI hashes: " in im.text["parameters"] and "VAE: vae" in im.text["parameters"]
    capsys.readouterr()
    rerun = main([str(jobs), "--model", "random:tiny", "--out", str(out), *size])  # (another VAE: another folder)
    assert rerun == 2 and f"its manifest is for model random:tiny with VAE {vae}, not random:tiny;" in \
        capsys.readouterr().err
    for option, match in ((["--vae", str(tmp_path / "none.safetensors")], "none.safetensors: no such file"),
                          (["--embeddings-dir", str(tmp_path / "none")], "--embeddings-dir"),):
        assert main([str(jobs), "--model", "random:tiny", "--out", str(tmp_path / "o2"), *option, *size]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("error: ") and match in line
    assert not (tmp_path / "o2").exists()


def test_jsonl_comments_stdin_and_a_csv_header_naming_a_field_twice(tmp_path, monkeypatch):
    """A '#' line in a JSONL file was a failed job (exit 1 on every run), as it is skipped in .txt; "-" was an
    "unknown job file type" (python -m fastsd.generate --infotext - reads stdin); a CSV header naming a field twice
    silently took the last cell."""
    import io

    jsonl = tmp_path / "j.jsonl"
    jsonl.write_text('# the cats\n{"prompt": "a cat"}\n  # {"prompt": "not this one"}\n{"prompt": "a dog"}\n')
    jobs = read_job_file(str(jsonl), SMALL)
    assert [(type(j), j.line) for j in jobs] == [(Job, 2), (Job, 4)]
    for text, prompts in (('\n# mine\n{"prompt": "a cat", "id": "c"}\n', ["a cat"]), ("a cat\n# x\na dog\n",
                                                                                       ["a cat", "a dog"])):
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
        assert [j.settings.prompt for j in read_job_file("-", SMALL)] == prompts
    same = read_job_file(str(jsonl), SMALL)  # the file and the same text on stdin: the same ids (resume)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(jsonl.read_bytes())))
    assert [j.id for j in read_job_file("-", SMALL)] == [j.id for j in same]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe")))
    with pytest.raises(ValueError, match=r"^- \(standard input\): not UTF-8 text \(byte 0\)$"):
        read_job_file("-", SMALL)
    csv = tmp_path / "j.csv"
    csv.write_text("prompt,seed,seed\na cat,1,2\n")
    with pytest.raises(ValueError, match=r"j\.csv: the CSV header names 'seed' twice$"):
        read_job_file(str(csv), SMALL)


def test_a_short_manifest_write_is_finished_or_an_error(tmp_path, monkeypatch):
    """os.write may write part of a line (a disk filling up): the rest was dropped and the run went on as if the
    line were written. Now the rest is written, or the error comes out (the run stops in one line)."""
    import errno
    import json

    from fastsd.batch import manifest
    from fastsd.batch.manifest import OutputFolder

    real, calls = os.write, []

    def short(fd, data):  # the first call writes 5 bytes, the next as asked, the third finds the disk full
        calls.append(len(data))
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, bytes(data[:5]) if len(calls) == 1 else data)

    monkeypatch.setattr(manifest.os, "write", short)
    with OutputFolder(str(tmp_path), "random:tiny") as folder:
        folder.append({"id": "a", "line": 1, "status": "done", "file": "a.png"})
        with pytest.raises(OSError, match="No space left"):
            folder.append({"id": "b", "line": 2, "status": "done", "file": "b.png"})
    (row,) = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert row["id"] == "a" and calls[1] == calls[0] - 5


def test_another_seed_option_gives_other_ids():
    """--seed 1000 then --seed 2000 into one folder: the ids were the same (the option's seeds were not in the digest
    behind them), so the second run made nothing and said "made before with other settings" once per job. The id is
    of the resolved settings; ids without the options and the seeds derived from a job don't move."""
    def jobs(**kw):
        return load_jobs(["a cat", "a dog"], Defaults(steps=1, width=64, height=64, **kw))

    first, second, none = jobs(seed=1000), jobs(seed=2000), jobs()
    assert [j.settings.seed for j in first + second] == [1000, 1001, 2000, 2001]
    assert not {j.id for j in first} & {j.id for j in second} and not {j.id for j in first} & {j.id for j in none}
    assert [j.id for j in jobs(seed=1000)] == [j.id for j in first]  # (stable)
    var = [jobs(subseed=s, subseed_strength=0.5) for s in (7, 8, None)]
    assert [[j.settings.subseed for j in v] for v in var[:2]] == [[7, 8], [8, 9]]
    assert len({j.id for v in var for j in v}) == 6
    assert len({tuple(j.settings.seed for j in v) for v in var}) == 1  # (the job's seed stays: A1111's variations)


@pytest.mark.parametrize("error, code", [(ValueError("the model can't load here"), 2), (KeyboardInterrupt(), 130)])
def test_a_run_stopped_before_its_first_result_leaves_no_folder(error, code, tmp_path, capsys, monkeypatch):
    """A worker that can't start (--ray --device cuda without a GPU: "every Ray worker died", exit 2) or Ctrl-C while
    the model loads left an empty --out folder holding only the lock file; a folder that was there stays."""
    from fastsd.batch.worker import BatchWorker

    def fails(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(BatchWorker, "__init__", fails)
    jobs = tmp_path / "j.txt"
    jobs.write_text("a cat\n")
    for out in (tmp_path / "new" / "out", tmp_path):
        assert main([str(jobs), "--model", "random:tiny", "--out", str(out), "--no-progress"]) == code
        assert capsys.readouterr().err.strip().count("\n") == 0
    assert not (tmp_path / "new" / "out").exists() and (tmp_path / "new").is_dir()
    assert sorted(os.listdir(tmp_path)) == [".fastsd-batch.lock", "j.txt", "new"]


def test_csv_integers_written_as_floats_are_integers(tmp_path):
    """pandas writes an integer column that has empty cells as floats ("12.0"): every such job failed with "seed must
    be an integer, got '12.0'", where JSON's 12.0 was taken."""
    csv = tmp_path / "j.csv"
    csv.write_text("prompt,seed,steps\na cat,12.0,3.0\na dog,,2\na cow,-1.0,\nan owl,1.5,\nan elk,1.0e3,\n")
    a, b, c, d, e = read_job_file(str(csv), SMALL)
    assert (a.settings.seed, a.settings.steps, b.settings.steps) == (12, 3, 2)
    assert isinstance(c, Job) and c.settings.seed != -1  # (A1111's random: derived)
    assert d.error == "seed must be an integer, got '1.5'" and e.error == "seed must be an integer, got '1.0e3'"


def test_a1111_payload_keys_that_change_nothing_are_taken():
    """A job line pasted from an A1111 txt2img payload (batch_size, n_iter, restore_faces, styles, send_images, ...)
    failed on its first key ("unknown field 'batch_size'"), the README calling A1111's API names aliases. Those keys at
    the values that change nothing in a one-image job are dropped, another value is the line's one-line failure, and
    the old sampler_index is the sampler where sampler_name is not given (A1111's rule)."""
    payload = {"prompt": "a cat", "seed": 3, "batch_size": 1, "n_iter": 1, "restore_faces": False, "tiling": False,
               "styles": [], "override_settings": {}, "override_settings_restore_afterwards": True, "script_args": [],
               "alwayson_scripts": {}, "send_images": True, "save_images": False, "do_not_save_grid": True,
               "script_name": None, "sampler_index": "Euler"}
    jobs = load_jobs([payload, {**payload, "sampler_name": "DDIM"}, {"prompt": "a cat", "seed": 3},
                      {**payload, "batch_size": 4}, {**payload, "styles": ["anime"]}, {**payload, "tiling": True}],
                     SMALL)
    assert [j.settings.sampler for j in jobs[:3]] == ["euler", "ddim", "euler_a"]
    assert jobs[0].manifest_settings() == {**jobs[2].manifest_settings(), "sampler": "euler"}
    assert jobs[3].error == ("batch_size 4: fastsd.batch takes A1111's batch_size only as 1; one job is one image: "
                             "give one line per image (seeds S, S+1, ...)")
    assert jobs[4].error.startswith("styles ['anime']: no styles file; give --styles-file PATH")  # (a field now)
    assert jobs[5].error == "tiling True: fastsd.batch takes A1111's tiling only as false"


def test_a_rerun_of_many_edited_jobs_says_so_in_a_few_lines(tmp_path, capsys):
    """A rerun after a changed option with explicit ids printed one "made before with other settings" line per job
    (thousands, overnight); now the first few and a count."""
    from fastsd.batch import run

    jobs = [{"prompt": f"a cat {i}", "id": f"c{i}"} for i in range(8)]
    run(jobs, model="random:tiny", out=str(tmp_path), defaults=SMALL, threads=1, progress=False)
    capsys.readouterr()
    rows = run(jobs, model="random:tiny", out=str(tmp_path), defaults=Defaults(steps=2, width=64, height=64),
               threads=1, progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert [r["status"] for r in rows] == ["done"] * 8 and len(err) == 6, err
    assert err[0].startswith("fastsd.batch: line 1: job c0 was made before with other settings (seed ")
    assert err[5] == "fastsd.batch: ... and 3 more jobs made before with other settings: their images are kept"
    rows = run(jobs + [{"prompt": "x", "seed": "?"}] * 7, model="random:tiny", out=str(tmp_path), defaults=SMALL,
               progress=False)  # (bad lines likewise: each one's reason is in the manifest)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 6 and err[-1] == "fastsd.batch: ... and 2 more jobs that can't run: the manifest has each " \
        "one's reason" and len(rows) == 15 and sum(r["status"] == "failed" for r in rows) == 7


def test_a1111_prompts_from_file_lines(tmp_path):
    """A .txt of A1111's "Prompts from file or textbox" script (`--prompt "a cat" --steps 3 ...`) ran each whole line
    as a prompt ("--prompt \\"a cat\\" --steps 3" drawn as text), silently."""
    txt = tmp_path / "p.txt"
    txt.write_text('--prompt "a cat, sitting" --negative_prompt ugly blurry --steps 3 --seed 5 --cfg_scale 6.5 '
                   '--sampler_name "DPM++ 2M Karras" --outpath_samples x\n--prompt a dog --batch_size 1\n'
                   '--prompt a cow --batch_size 2\n--prompt "open\n--steps\na plain prompt -- with dashes\n')
    a, b, c, d, e, f = read_job_file(str(txt), SMALL)
    s = a.settings
    assert (s.prompt, s.negative_prompt, s.steps, s.seed, s.guidance_scale, s.sampler) == (
        "a cat, sitting", "ugly blurry", 3, 5, 6.5, "dpmpp_2m_karras")
    assert b.settings.prompt == "a dog" and c.error.startswith("batch_size '2': fastsd.batch takes A1111's")
    assert d.error == "A1111 prompts-from-file line: No closing quotation"
    assert e.error == "A1111 prompts-from-file line: expected --NAME VALUE at '--steps'"
    assert f.settings.prompt == "a plain prompt -- with dashes"
