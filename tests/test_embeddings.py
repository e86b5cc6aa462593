"""Textual-inversion embeddings: A1111 .pt / .safetensors and diffusers learned_embeds files, named in
prompts by file name (A1111's token rule), against diffusers' load_textual_inversion (prompt embeddings
within 1e-5); chunking counts their vectors; bad files are one-line errors (exit 2 on the CLI)."""
import os
import re

import pytest
import safetensors.torch
import torch
from oracles import rel_err, save_diffusers_folder

from fastsd import CheckpointError, GenerationSettings, load_pipeline
from fastsd.config import TINY
from fastsd.generate import main
from fastsd.image import parse_infotext
from fastsd.testing import SD15_SCHEDULER, tokenizer

WIDTH = TINY.clip.hidden_size


def vectors(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A TINY diffusers folder, fastsd's pipeline on it with an embeddings folder in each format."""
    root = tmp_path_factory.mktemp("ti")
    unet, vae, clip = save_diffusers_folder(TINY, root / "model")
    emb = root / "embeddings"
    (emb / "sub" / "cat-toy").mkdir(parents=True)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors(3, 1)}, "name": "mystyle",
                "step": 500, "sd_checkpoint": "abc", "sd_checkpoint_name": "x"}, emb / "mystyle.pt")  # A1111 .pt
    safetensors.torch.save_file({"emb_params": vectors(2, 2)}, str(emb / "badthing.safetensors"))  # A1111 st
    torch.save({"<cat-toy>": vectors(1, 3)[0]}, emb / "sub" / "cat-toy" / "learned_embeds.bin")  # diffusers
    pipe = load_pipeline(str(root / "model"), device="cpu", dtype="fp32", backend="torch")
    assert sorted(pipe.load_embeddings(str(emb))) == ["badthing", "cat-toy", "mystyle"]
    return root, pipe, (unet, vae, clip)


def diffusers_pipe(models, emb):
    import diffusers

    unet, vae, clip = models
    sp = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=clip, tokenizer=tokenizer(), unet=unet, safety_checker=None, feature_extractor=None,
        scheduler=diffusers.EulerDiscreteScheduler.from_config(SD15_SCHEDULER), requires_safety_checker=False)
    sp.load_textual_inversion(str(emb / "mystyle.pt"), token="mystyle")  # 3 vectors: mystyle, mystyle_1, _2
    sp.load_textual_inversion(str(emb / "badthing.safetensors"), token="badthing")
    sp.load_textual_inversion(str(emb / "sub" / "cat-toy" / "learned_embeds.bin"), token="cat-toy")
    return sp


@pytest.mark.parametrize("prompt, negative", [
    ("a photo of mystyle, on a table", "badthing, blurry"),
    ("cat-toy sitting on a bench in mystyle", "lowres badthing"),
    ("a plain prompt", ""),
])
def test_prompt_embeddings_match_diffusers_load_textual_inversion(tiny, prompt, negative):
    root, pipe, models = tiny
    sp = diffusers_pipe(models, root / "embeddings")
    ref, ref_neg = sp.encode_prompt(prompt, "cpu", 1, True, negative_prompt=negative)
    cond, uncond = pipe.encode_prompt([prompt], [negative])
    assert rel_err(cond, ref) <= 1e-5 and rel_err(uncond, ref_neg) <= 1e-5
    plain = pipe.encode_prompt([prompt.replace("mystyle", "x").replace("cat-toy", "x")], [negative])[0]
    assert "mystyle" not in prompt or not torch.allclose(plain, cond)  # the embedding made a difference


def test_multi_vector_embeddings_take_that_many_slots_and_chunks_count_them(tiny):
    _, pipe, _ = tiny
    tok, emb = pipe.tokenizer, pipe.embeddings
    # 72 words + 3 vectors fit in one 75-token chunk; 73 + 3 do not: the embedding starts the next chunk
    ids, weights, fixes = tok.encode_with_embeddings("word " * 72 + "(mystyle:1.5)", emb)
    assert ids.shape == (1, 77) and [(c, p, k) for c, p, _, k in fixes] == [(0, 73, 0), (0, 74, 1), (0, 75, 2)]
    assert ids[0, 76] == 49407 and weights[0, 73:76].tolist() == [1.5] * 3
    ids, _, fixes = tok.encode_with_embeddings("word " * 73 + "mystyle", emb)
    assert ids.shape == (2, 77) and [(c, p) for c, p, _, _ in fixes] == [(1, 1), (1, 2), (1, 3)]
    assert ids[0, 74] == 49407  # chunk 0 holds the 73 words, then EOS padding
    assert all(torch.equal(e.vectors[k], vectors(3, 1)[k]) for _, _, e, k in fixes)
    cond = pipe.encode_prompt(["word " * 73 + "mystyle"], [""])[0]
    assert cond.shape == (1, 154, WIDTH)


def test_longest_name_wins_and_names_are_token_sequences(tmp_path):
    pipe = load_pipeline("random:tiny", device="cpu", dtype="fp32")
    safetensors.torch.save_file({"emb_params": vectors(1, 4)}, str(tmp_path / "bad-hands.safetensors"))
    safetensors.torch.save_file({"emb_params": vectors(2, 5)}, str(tmp_path / "bad-hands-5.safetensors"))
    (tmp_path / "z").mkdir()
    safetensors.torch.save_file({"emb_params": vectors(3, 6)}, str(tmp_path / "z" / "bad-hands.safetensors"))
    assert pipe.load_embeddings(str(tmp_path)) == ["bad-hands", "bad-hands-5"]
    emb = pipe.embeddings
    assert emb.get("bad-hands").path == str(tmp_path / "bad-hands.safetensors")  # one name: the first file
    assert [e.name for e in emb.used(["bad-hands-5, a cat"])] == ["bad-hands-5"]
    assert [e.name for e in emb.used(["bad-hands, a cat"])] == ["bad-hands"]
    assert [e.name for e in emb.used(["Bad-Hands"])] == ["bad-hands"]  # CLIP lower-cases, as in A1111
    assert emb.used(["bad hands", "badhands"]) == []


def test_infotext_records_ti_hashes(tiny):
    import hashlib

    root, pipe, _ = tiny
    s = GenerationSettings("a photo of mystyle", "badthing", seed=1, width=32, height=32)
    params = parse_infotext(pipe.infotext(s))[2]
    h = {n: hashlib.sha256((root / "embeddings" / f).read_bytes()).hexdigest()[:12]
         for n, f in (("mystyle", "mystyle.pt"), ("badthing", "badthing.safetensors"))}
    assert params["TI hashes"] == f"mystyle: {h['mystyle']}, badthing: {h['badthing']}"
    assert "TI hashes" not in parse_infotext(pipe.infotext(s.replace(prompt="a cat", negative_prompt="")))[2]


# ---- bad input ------------------------------------------------------------------------------------------

@pytest.fixture
def bad_dir(tmp_path):
    d = tmp_path / "emb"
    d.mkdir()
    safetensors.torch.save_file({"emb_params": torch.zeros(2, 1024)}, str(d / "sdtwo.safetensors"))
    safetensors.torch.save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)},
                                str(d / "xlthing.safetensors"))
    torch.save({"a": torch.zeros(2), "b": torch.zeros(2)}, d / "twothings.pt")
    torch.save({"string_to_param": {"*": torch.zeros(80, WIDTH)}}, d / "toolong.pt")
    (d / "junk.pt").write_bytes(b"not a pickle")
    safetensors.torch.save_file({"emb_params": vectors(1, 9)}, str(d / "good.safetensors"))
    return d


@pytest.mark.parametrize("word, match", [
    ("sdtwo", "an embedding of width 1024 (a Stable Diffusion 2.x embedding); this model's text encoder takes 128"),
    ("xlthing", "an SDXL embedding (clip_l / clip_g)"),
    ("twothings", "not a textual-inversion embedding"),
    ("toolong", "80 vectors; an embedding must fit in one 75-token chunk"),
    ("junk", "junk.pt: not a torch checkpoint"),
])
def test_bad_embeddings_used_in_a_prompt_are_one_line_errors(bad_dir, word, match):
    pipe = load_pipeline("random:tiny", device="cpu", dtype="fp32")
    pipe.load_embeddings(str(bad_dir))
    with pytest.raises(CheckpointError, match=re.escape(match)) as e:
        pipe.encode_prompt([f"a photo, {word}"], [""])
    assert "\n" not in str(e.value)
    pipe.encode_prompt(["a photo, good"], [""])  # files no prompt names cost nothing


def test_cli_embeddings_dir_and_env(tiny, bad_dir, tmp_path, capsys, monkeypatch):
    root, _, _ = tiny
    args = ["--model", str(root / "model"), "--steps", "1", "--width", "32", "--height", "32", "--no-progress"]
    out = tmp_path / "a.png"
    assert main(["a photo of mystyle", *args, "--embeddings-dir", str(root / "embeddings"), "--seed", "2",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    from PIL import Image

    with Image.open(out) as im:
        assert parse_infotext(im.text["parameters"])[2]["TI hashes"].startswith("mystyle: ")
    monkeypatch.setenv("FASTSD_EMBEDDINGS_DIR", str(bad_dir))
    folder = tmp_path / "o"
    for prompt, extra, match in (("a sdtwo cat", [], "width 1024"),
                                 ("a cat", ["--embeddings-dir", str(tmp_path / "nope")], "--embeddings-dir"),
                                 ("a cat", [], None)):
        code = main([prompt, *args, *extra, "--out", str(folder)])
        err = capsys.readouterr().err.strip().splitlines()
        if match is None:
            assert code == 0
            continue
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
        assert not folder.exists() or not any(folder.iterdir())
    monkeypatch.setenv("FASTSD_EMBEDDINGS_DIR", str(tmp_path / "gone"))
    assert main(["a cat", *args, "--out", str(folder)]) == 2
    assert "$FASTSD_EMBEDDINGS_DIR" in capsys.readouterr().err
    assert os.listdir(folder) and len(os.listdir(folder)) == 1  # only the one good run above wrote


@pytest.mark.slow
def test_sd15_size_prompt_embeddings_match_diffusers(tmp_path):
    """random:sd15's text encoder (768 wide) with a 4-vector A1111 embedding, against diffusers."""
    from fastsd.testing import diffusers_pipeline

    pipe = load_pipeline("random:sd15", device="cpu", dtype="fp32", backend="torch")
    torch.save({"string_to_token": {"*": 265}, "name": "sdstyle", "step": 100,
                "string_to_param": {"*": torch.randn(4, 768, generator=torch.Generator().manual_seed(0))}},
               tmp_path / "sdstyle.pt")  # A1111's layout (diffusers reads a one-key dict as {token: tensor})
    pipe.load_embeddings(str(tmp_path))
    sp = diffusers_pipeline(pipe)
    sp.load_textual_inversion(str(tmp_path / "sdstyle.pt"), token="sdstyle")
    prompt, negative = "a castle on a hill, sdstyle, evening light", "sdstyle blurry"
    ref, ref_neg = sp.encode_prompt(prompt, "cpu", 1, True, negative_prompt=negative)
    cond, uncond = pipe.encode_prompt([prompt], [negative])
    assert rel_err(cond, ref) <= 1e-5 and rel_err(uncond, ref_neg) <= 1e-5


# ---- embeddings with NaN, infinite or absurdly large values ------------------------------------------------

def _save_embedding(folder, fmt: str, vecs: torch.Tensor):
    """`vecs` in one of the formats read: A1111 .pt and .safetensors, diffusers learned_embeds .bin and
    .safetensors (named by their folder). Returns (prompt word, file)."""
    if fmt == "a1111.pt":
        path = folder / "badvals.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vecs}, "name": "badvals"}, path)
    elif fmt == "a1111.safetensors":
        path = folder / "badvals.safetensors"
        safetensors.torch.save_file({"emb_params": vecs}, str(path))
    else:
        (folder / "badvals").mkdir()
        path = folder / "badvals" / f"learned_embeds.{fmt.split('.')[1]}"
        if fmt.endswith(".bin"):
            torch.save({"<badvals>": vecs[0]}, path)
        else:
            safetensors.torch.save_file({"<badvals>": vecs[0]}, str(path))
    return "badvals", path


FORMATS = ["a1111.pt", "a1111.safetensors", "diffusers.bin", "diffusers.safetensors"]
BAD_VALUES = [(float("nan"), "NaN or infinite values"), (float("inf"), "NaN or infinite values"),
              (float("-inf"), "NaN or infinite values"), (1e38, "values as large as 1e+38"),
              (-2e4, "values as large as 2e+04")]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("value, match", BAD_VALUES, ids=["nan", "inf", "-inf", "1e38", "-2e4"])
def test_embeddings_with_bad_values_are_one_line_errors_naming_the_file(tmp_path, fmt, value, match):
    vecs = vectors(2 if fmt.startswith("a1111") else 1, 7)
    vecs[0, 3] = value
    word, path = _save_embedding(tmp_path, fmt, vecs)
    pipe = load_pipeline("random:tiny", device="cpu", dtype="fp32")
    assert pipe.load_embeddings(str(tmp_path)) == [word]
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: an embedding with {match}")) as e:
        pipe.encode_prompt([f"a photo, {word}"], [""])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("fmt", FORMATS)
def test_embeddings_of_ordinary_size_still_load(tmp_path, fmt):
    vecs = vectors(1, 8) * 50  # well above real token embeddings, well below the bound
    word, path = _save_embedding(tmp_path, fmt, vecs)
    pipe = load_pipeline("random:tiny", device="cpu", dtype="fp32")
    pipe.load_embeddings(str(tmp_path))
    assert [e.path for e in pipe.embeddings.used([f"a {word}"])] == [str(path)]
    assert torch.equal(pipe.embeddings.get(word).vectors, vecs)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("value", [float("nan"), 1e38], ids=["nan", "1e38"])
def test_cli_embeddings_with_bad_values(tmp_path, capsys, fmt, value):
    emb = tmp_path / "emb"
    emb.mkdir()
    vecs = vectors(1, 9)
    vecs[0, 0] = value
    word, path = _save_embedding(emb, fmt, vecs)
    out = tmp_path / "out"
    code = main([f"a photo of {word}", "--model", "random:tiny", "--steps", "1", "--width", "32", "--height", "32",
                 "--no-progress", "--embeddings-dir", str(emb), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {path}: an embedding with "), err
    assert "emphasis" not in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_cli_embeddings_dir_given_a_file(tmp_path, capsys):
    """--embeddings-dir FILE: the message says a folder is wanted, not "no such folder" about a path that exists."""
    safetensors.torch.save_file({"emb_params": vectors(1, 10)}, str(tmp_path / "one.safetensors"))
    out = tmp_path / "a.png"
    code = main(["a one", "--model", "random:tiny", "--steps", "1", "--width", "32", "--height", "32", "--no-progress",
                 "--embeddings-dir", str(tmp_path / "one.safetensors"), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "one.safetensors: a file; give the folder that holds the embeddings" in err[0]
    assert not out.exists()
