"""LoRA files that bundle textual-inversion embeddings (A1111's `bundle_emb.NAME.<key>`): the prompt embeddings equal
those of the same embedding as a file, in every form the bundling tools write; they go with the LoRA (unload, a
new set), a file of the same name wins (A1111's order), the infotext's "TI hashes" name the LoRA (A1111's
BundledTIHash); a bad bundled embedding is a one-line error naming the file and the embedding, with nothing
applied; the CLI (--lora, <lora:NAME>) and the server read them through the same load."""
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_embeddings import vectors
from test_lora import CLI, assert_same_state, state, tiny

from fastsd import CheckpointError, GenerationSettings
from fastsd.config import TINY
from fastsd.generate import main
from fastsd.image import parse_infotext
from fastsd.testing_lora import write_random_lora

PROMPT, NEGATIVE = "a photo of inkstyle, on a table", "lowres inkstyle"


def bundle(path, pipe, embs: dict, seed: int = 1) -> str:
    """A kohya LoRA of random UNet layers (the text encoder untouched, so prompt embeddings show the embeddings alone)
    with `embs` ({NAME: {key: tensor}}) bundled as bundle_emb.NAME.<key>; `.pt` files through torch.save."""
    path = str(path)
    write_random_lora(path, pipe, fmt="kohya_ldm", rank=4, seed=seed, text_encoder=False)
    sd = {k: v.clone() for k, v in load_file(path).items()}  # (not views of the file it overwrites)
    sd |= {f"bundle_emb.{name}.{k}": v for name, keys in embs.items() for k, v in keys.items()}
    if path.endswith(".pt"):
        torch.save(sd, path)
    else:
        save_file(sd, path)
    return path


def a1111_file(folder, name: str, vecs: torch.Tensor):
    """The embedding as a standalone A1111 .pt file."""
    folder.mkdir(exist_ok=True)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vecs}, "name": name, "step": 100},
               folder / f"{name}.pt")
    return folder


# What bundling tools write: kohya's and HCP-Diffusion's scripts flatten an A1111 .pt (string_to_param.*) or keep
# an A1111 .safetensors' emb_params; OneTrainer writes SD1's vectors as clip_l; a diffusers file's {token: (D,)}.
FORMS = {
    "string_to_param": ("lora.safetensors", lambda v: {"string_to_param.*": v}),
    "string_to_param, .pt LoRA": ("lora.pt", lambda v: {"string_to_param.*": v}),
    "emb_params": ("lora.safetensors", lambda v: {"emb_params": v}),
    "onetrainer clip_l": ("lora.safetensors", lambda v: {"clip_l": v}),
    "diffusers token": ("lora.safetensors", lambda v: {"<inkstyle>": v[0]}),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_bundled_embedding_is_the_same_embedding_as_a_file(tmp_path, form):
    file_name, keys = FORMS[form]
    vecs = vectors(1 if form == "diffusers token" else 3, 1)
    pipe = tiny()
    plain = pipe.encode_prompt([PROMPT], [NEGATIVE])
    path = bundle(tmp_path / file_name, pipe, {"inkstyle": keys(vecs)})
    pipe.load_lora(path, 0.8)
    cond, uncond = pipe.encode_prompt([PROMPT], [NEGATIVE])
    assert [e.name for e in pipe.embeddings.used([PROMPT])] == ["inkstyle"]
    assert not torch.allclose(cond, plain[0]) and not torch.allclose(uncond, plain[1])  # the embedding was used
    s = GenerationSettings(PROMPT, NEGATIVE, seed=1, width=32, height=32)
    params = parse_infotext(pipe.infotext(s))[2]
    assert params["TI hashes"] == "inkstyle: lora"  # A1111's BundledTIHash: the LoRA's name
    pipe.unload_loras()
    pipe.load_embeddings(str(a1111_file(tmp_path / "emb", "inkstyle", vecs)))  # the same vectors as a file
    ref, ref_neg = pipe.encode_prompt([PROMPT], [NEGATIVE])
    assert torch.equal(cond, ref) and torch.equal(uncond, ref_neg)


def test_they_go_with_their_lora(tmp_path):
    """Usable while the LoRA is loaded (whether a tag names it or not, as every loaded LoRA applies in fastsd): gone
    at unload_loras, replaced with a new set; of two LoRAs bundling one name the first loaded wins (A1111's order);
    those of a LoRA merged for good stay."""
    pipe = tiny()
    one = bundle(tmp_path / "one.safetensors", pipe, {"inkstyle": {"emb_params": vectors(2, 1)},
                                                      "onlyone": {"emb_params": vectors(1, 2)}})
    two = bundle(tmp_path / "two.safetensors", pipe, {"inkstyle": {"emb_params": vectors(1, 3)}}, seed=2)
    plain = pipe.encode_prompt(["inkstyle onlyone"], [""])[0]

    def used(text="inkstyle onlyone"):
        return [(e.name, len(e.vectors), e.hash) for e in pipe.embeddings.used([text])]

    pipe.load_loras([(one, 1.0), (two, 0.5)])
    assert used() == [("inkstyle", 2, "one"), ("onlyone", 1, "one")]
    pipe.unload_loras()
    assert used() == [] and torch.equal(pipe.encode_prompt(["inkstyle onlyone"], [""])[0], plain)
    pipe.load_loras([(two, 0.5, "second"), (one, 1.0)])
    assert used() == [("inkstyle", 1, "second"), ("onlyone", 1, "one")]
    pipe.unload_loras()
    pipe.load_lora(two, keep_originals=False)  # merged for good: stays, with its embeddings
    pipe.load_lora(one)
    pipe.unload_loras()
    assert used() == [("inkstyle", 1, "two")]


@pytest.mark.parametrize("files_first", [True, False])
def test_an_embedding_file_of_the_same_name_wins(tmp_path, files_first):
    """A1111 skips a bundled embedding whose name its embeddings folder has ("Skip bundle embedding ... already loaded
    from embeddings folder"), whichever is loaded first here."""
    pipe = tiny()
    path = bundle(tmp_path / "lora.safetensors", pipe, {"inkstyle": {"emb_params": vectors(2, 5)},
                                                        "other": {"emb_params": vectors(1, 6)}})
    folder = a1111_file(tmp_path / "emb", "inkstyle", vectors(3, 7))
    for load in ((lambda: pipe.load_embeddings(str(folder)), lambda: pipe.load_lora(path)) if files_first else
                 (lambda: pipe.load_lora(path), lambda: pipe.load_embeddings(str(folder)))):
        load()
    used = pipe.embeddings.used(["inkstyle other"])
    assert [(e.name, e.path) for e in used] == [("inkstyle", str(folder / "inkstyle.pt")), ("other", path)]
    assert torch.equal(used[0].vectors, vectors(3, 7))
    pipe.unload_loras()
    assert [e.name for e in pipe.embeddings.used(["inkstyle other"])] == ["inkstyle"]  # the file stays
    pipe.embeddings.forget_files()  # (the server's refresh-embeddings): the files go, bundled ones stay
    pipe.load_lora(path)
    pipe.embeddings.forget_files()
    assert [e.name for e in pipe.embeddings.used(["inkstyle other"])] == ["inkstyle", "other"]


D = TINY.clip.hidden_size  # random:tiny's text encoder width
BAD = {  # (one of another width, an SD2 one, is skipped with a warning: tests/test_lora_formats2.py)
    "sdxl": ({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)},
             "bundle_emb.bad: an SDXL embedding (clip_l / clip_g)"),
    "empty": ({"emb_params": torch.zeros(0, D)}, f"bundle_emb.bad: an embedding of shape (0, {D})"),
    "nan": ({"emb_params": torch.full((1, D), float("nan"))}, "bundle_emb.bad: an embedding with NaN or infinite"),
    "huge": ({"emb_params": torch.full((1, D), 1e30)}, "bundle_emb.bad: an embedding with values as large as 1e+30"),
    "3-d": ({"emb_params": torch.zeros(1, 2, D)}, f"bundle_emb.bad: an embedding of shape (1, 2, {D})"),
    "two params": ({"string_to_param.*": torch.randn(1, D), "string_to_param.x": torch.randn(1, D)},
                   "bundle_emb.bad: string_to_param holds 2 entries"),
    "two tensors": ({"clip_l": torch.randn(1, D), "clip_l_out": torch.randn(1, D)},
                    "bundle_emb.bad: not a textual-inversion embedding"),
    "too long": ({"emb_params": torch.randn(80, D)}, "bundle_emb.bad: 80 vectors; an embedding must fit"),
    "no key": ({"": torch.randn(1, D)}, "bundle_emb.bad.: a bundled embedding's tensors are named"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_bundled_embedding_is_one_line_and_nothing_is_applied(tmp_path, case):
    pipe = tiny()
    good = bundle(tmp_path / "good.safetensors", pipe, {"inkstyle": {"emb_params": vectors(1, 8)}})
    pipe.load_lora(good)
    state0, embs0 = state(pipe), pipe.embeddings.used(["inkstyle bad"])
    path = bundle(tmp_path / "broken.safetensors", pipe, {"bad": BAD[case][0], "fine": {"emb_params": vectors(1, 9)}},
                  seed=3)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: {BAD[case][1]}")) as e:
        pipe.load_loras([(good, 0.5), (path, 1.0)])
    assert "\n" not in str(e.value)
    assert_same_state(pipe, state0)  # no weight changed, the loaded LoRAs and their embeddings are as they were
    assert [x.name for x in pipe.loras] == ["good"] and pipe.embeddings.used(["inkstyle bad fine"]) == embs0


def test_a_file_of_bundled_embeddings_alone_is_taken(tmp_path):
    """No layer at all, only bundle_emb keys: A1111 loads it (a LoRA of no modules); an empty file still is no LoRA."""
    pipe = tiny()
    path = str(tmp_path / "embs_only.safetensors")
    save_file({"bundle_emb.inkstyle.emb_params": vectors(2, 1)}, path)
    state0 = state(pipe)
    pipe.load_lora(path)
    assert_same_state(pipe, state0)
    assert [(x.name, x.layers) for x in pipe.loras] == [("embs_only", 0)]
    assert [e.name for e in pipe.embeddings.used(["inkstyle"])] == ["inkstyle"]
    save_file({"something": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not a LoRA"):
        pipe.load_lora(path)


def _png(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), parse_infotext(im.text["parameters"])


def test_cli_lora_file_and_tag_give_the_image_of_the_embedding_file(tmp_path, capsys):
    """--lora FILE and <lora:NAME> (--lora-dir) with a bundle: the image of the same LoRA without it plus the
    embedding as a file (--embeddings-dir); a bad bundle: exit 2, one line naming the file and the embedding; one of
    another width (SD2's): skipped as A1111 skips it, one warning line, the image made."""
    pipe = tiny()
    loras = tmp_path / "loras"
    loras.mkdir()
    vecs = vectors(2, 4)
    bundled = bundle(loras / "ink.safetensors", pipe, {"inkstyle": {"string_to_param.*": vecs}})
    plain = str(tmp_path / "plain.safetensors")
    save_file({k: v for k, v in load_file(bundled).items() if not k.startswith("bundle_emb.")}, plain)
    folder = a1111_file(tmp_path / "emb", "inkstyle", vecs)
    runs = {"file": ["a photo of inkstyle", "--lora", f"{bundled}:0.7"],
            "tag": ["a photo of inkstyle <lora:ink:0.7>", "--lora-dir", str(loras)],
            "embedding file": ["a photo of inkstyle", "--lora", f"{plain}:0.7", "--embeddings-dir", str(folder)],
            "nothing": ["a photo of inkstyle", "--lora", f"{plain}:0.7"]}
    out = {}
    for run, args in runs.items():
        assert main([*args, *CLI, "--out", str(tmp_path / f"{run}.png")]) == 0, capsys.readouterr().err
        out[run] = _png(tmp_path / f"{run}.png")
    assert np.array_equal(out["file"][0], out["embedding file"][0])
    assert np.array_equal(out["tag"][0], out["embedding file"][0])
    assert not np.array_equal(out["nothing"][0], out["file"][0])
    assert out["file"][1][2]["TI hashes"] == out["tag"][1][2]["TI hashes"] == "inkstyle: ink"
    assert "TI hashes" not in out["nothing"][1][2]
    bad = bundle(loras / "bad.safetensors", pipe, {"broken": {"emb_params": torch.full((1, D), float("nan"))}})
    capsys.readouterr()
    for args in (["--lora", bad], ["--lora-dir", str(loras)]):
        prompt = "a cat" if args[0] == "--lora" else "a cat <lora:bad:1>"
        code = main([prompt, *args, *CLI, "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
        assert "bad.safetensors: bundle_emb.broken: an embedding with NaN" in err[0], err
        assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
    wide = bundle(loras / "wide.safetensors", pipe, {"sdtwo": {"emb_params": torch.randn(1, 1024)}})
    assert main(["a cat", "--lora", wide, *CLI, "--out", str(tmp_path / "wide")]) == 0
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "bundle_emb" in line]
    assert len(err) == 1 and err[0].startswith("warning: ") and "skipped" in err[0], err
    assert "wide.safetensors: bundle_emb.sdtwo: an embedding of width 1024" in err[0], err
    assert any((tmp_path / "wide").iterdir())


def test_server_loras_by_tag_bring_their_embeddings(tmp_path):
    """fastsd.serve: <lora:NAME> merges the LoRA with its bundled embeddings for that request (a request without the
    tag has neither, as in A1111); POST /refresh-embeddings keeps them."""
    from serve_server import info, shared

    folder = tmp_path / "loras"
    folder.mkdir()
    bundle(folder / "ink.safetensors", tiny(), {"inkstyle": {"emb_params": vectors(2, 4)}})
    server = shared("--model", "random:tiny", "--lora-dir", str(folder))
    small = {"steps": 1, "width": 64, "height": 64, "seed": 3}

    def ti_hashes(prompt):
        r = c.post("/sdapi/v1/txt2img", json={**small, "prompt": prompt})
        assert r.status_code == 200, r.text
        return parse_infotext(info(r)["infotexts"][0])[2].get("TI hashes")

    try:
        with server.client() as c:
            assert ti_hashes("a photo of inkstyle <lora:ink:0.6>") == "inkstyle: ink"
            assert c.post("/sdapi/v1/refresh-embeddings").status_code == 200
            assert ti_hashes("a photo of inkstyle <lora:ink:0.6>") == "inkstyle: ink"
            assert ti_hashes("a photo of inkstyle") is None
    finally:
        server.stop()


def test_batch_jobs_get_them_with_their_loras(tmp_path):
    """fastsd.batch: a job's LoRA (tag or loras field) brings its bundled embeddings, a job without it has none (the
    worker's next set); a bad bundle fails its job alone, in one line naming the file and the embedding."""
    import os

    from fastsd.batch import Defaults, run
    from PIL import Image

    folder = tmp_path / "loras"
    folder.mkdir()
    bundle(folder / "ink.safetensors", tiny(), {"inkstyle": {"emb_params": vectors(2, 4)}})
    bundle(folder / "bad.safetensors", tiny(), {"sdtwo": {"emb_params": torch.full((1, D), float("nan"))}})
    jobs = [{"prompt": "a photo of inkstyle <lora:ink:0.7>", "seed": 1, "id": "tag"},
            {"prompt": "a photo of inkstyle", "seed": 1, "id": "field", "loras": ["ink:0.7"]},
            {"prompt": "a photo of inkstyle", "seed": 1, "id": "none"},
            {"prompt": "a cat <lora:bad:1>", "seed": 1, "id": "bad"}]
    out = str(tmp_path / "out")
    rows = run(jobs, out=out, model="random:tiny", threads=1, progress=False, lora_dir=str(folder),
               defaults=Defaults(steps=1, width=64, height=64))
    assert [r["status"] for r in rows] == ["done", "done", "done", "failed"], rows
    assert "bad.safetensors: bundle_emb.sdtwo: an embedding with NaN" in rows[3]["error"]
    assert "\n" not in rows[3]["error"]
    hashes, pixels = {}, {}
    for job in ("tag", "field", "none"):
        with Image.open(os.path.join(out, f"{job}.png")) as im:
            hashes[job] = parse_infotext(im.text["parameters"])[2].get("TI hashes")
            pixels[job] = np.asarray(im.convert("RGB"))
    assert hashes == {"tag": "inkstyle: ink", "field": "inkstyle: ink", "none": None}
    assert np.array_equal(pixels["tag"], pixels["field"]) and not np.array_equal(pixels["tag"], pixels["none"])
