"""Regressions found by a bug hunt on two features: LoRA files that bundle textual-inversion embeddings
(`bundle_emb.NAME.*`) and A1111's inpainting_mask_weight option."""
import pytest
import torch
from test_embeddings import vectors
from test_inpaint_mask_weight import KW, _concats, _noise_image
from test_lora import tiny
from test_lora_bundle_emb import bundle

from fastsd import GenerationSettings
from fastsd.image import parse_infotext


@pytest.fixture(scope="module")
def tiny_inpainting():
    import fastsd

    return fastsd.load_pipeline("random:tiny-inpainting", device="cpu", dtype="fp32", backend="torch")


@pytest.mark.parametrize("upscaler", ["Latent", "Nearest"])
def test_hires_pass_of_several_images_below_weight_1(tiny_inpainting, monkeypatch, upscaler):
    """A 9-channel model's hires second pass below weight 1 is conditioned on each image's own upscaled picture: two
    images in one call get two rows (it raised "Sizes of tensors must match" with the mask channel's single row)."""
    hires = dict(hires_scale=1.5, hires_steps=1, hires_strength=0.5, hires_upscaler=upscaler, num_images=2)
    seen, _, images = _concats(tiny_inpainting, monkeypatch, inpainting_mask_weight=0.5, **hires, **KW)
    second = seen[1]
    assert len(images) == 2 and second.shape[:2] == (2, 5)
    assert torch.equal(second[:, :1], torch.ones(2, 1, 12, 12)) and not torch.equal(second[0, 1:], second[1, 1:])


def test_img2img_of_several_init_images(tiny_inpainting, monkeypatch):
    """Two init images (A1111's init_images) on a 9-channel model: each image's own masked-image latents."""
    inits = [_noise_image(seed=s) for s in (1, 2)]
    (got,), _, images = _concats(tiny_inpainting, monkeypatch, image=inits, num_images=2, strength=0.6,
                                 inpainting_mask_weight=0.5, **KW)
    assert len(images) == 2 and got.shape[:2] == (2, 5) and not torch.equal(got[0, 1:], got[1, 1:])


def test_ti_hashes_do_not_count_the_word_inside_a_lora_tag(tmp_path):
    """A bundled embedding named as its LoRA: the word inside <lora:ink:1> is no use of it (the text encoder never
    sees the tag; A1111's TI hashes come from the prompt without it); the word in the prompt is."""
    pipe = tiny()
    pipe.load_lora(bundle(tmp_path / "ink.safetensors", pipe, {"ink": {"emb_params": vectors(2, 1)}}))

    def ti_hashes(prompt):
        return parse_infotext(pipe.infotext(GenerationSettings(prompt, "", seed=1, width=32, height=32)))[2].get(
            "TI hashes")

    assert ti_hashes("a cat <lora:ink:1>") is None
    assert ti_hashes("an ink cat <lora:ink:1>") == "ink: ink"


def test_an_embedding_file_that_cannot_be_used_leaves_the_name_to_the_bundled_one(tmp_path):
    """A1111 skips a bundled embedding only when its embeddings folder *loaded* one of that name (`emb_name in
    emb_db.word_embeddings`): a file of another width (its skipped_embeddings) or one it can't read leaves the name to
    the LoRA's. Without the LoRA the file's error stays."""

    from fastsd import CheckpointError

    pipe = tiny()
    folder = tmp_path / "emb"
    folder.mkdir()
    torch.save({"string_to_param": {"*": torch.randn(2, 1024)}}, folder / "inkstyle.pt")  # an SD2 embedding
    (folder / "broken.pt").write_bytes(b"not a torch file")
    pipe.load_embeddings(str(folder))
    vecs = vectors(2, 1)
    pipe.load_lora(bundle(tmp_path / "lora.safetensors", pipe, {"inkstyle": {"emb_params": vecs},
                                                                "broken": {"emb_params": vectors(1, 2)}}))
    used = pipe.embeddings.used(["inkstyle broken"])
    assert [(e.name, e.hash) for e in used] == [("inkstyle", "lora"), ("broken", "lora")]
    assert torch.equal(used[0].vectors, vecs)
    pipe.unload_loras()
    with pytest.raises(CheckpointError, match="inkstyle.pt: an embedding of width 1024"):
        pipe.embeddings.used(["inkstyle"])


def test_server_bundled_embeddings_listed_and_used_over_an_unusable_file(tmp_path):
    """fastsd.serve: GET /sdapi/v1/embeddings lists a merged LoRA's bundled embeddings under "loaded" (A1111 registers
    them in its word_embeddings, which the route lists) until a request without the tag; an SD2 file of the same name
    stays under "skipped" (after a refresh too) and leaves its name to the bundled one. Two images with the hires fix
    on a 9-channel model below weight 1, and img2img of two init images on it, answer 200."""
    from serve_server import info, png_b64, shared

    loras, embs = tmp_path / "loras", tmp_path / "embs"
    loras.mkdir()
    embs.mkdir()
    bundle(loras / "ink.safetensors", tiny(), {"inkstyle": {"emb_params": vectors(2, 4)}})
    torch.save({"string_to_param": {"*": torch.randn(2, 1024)}}, embs / "inkstyle.pt")
    server = shared("--model", "random:tiny", "--model", "random:tiny-inpainting", "--lora-dir", str(loras),
                    "--embeddings-dir", str(embs))
    small = {"steps": 1, "width": 64, "height": 64, "seed": 3}
    try:
        with server.client(timeout=300) as c:
            def ti_hashes(prompt):
                r = c.post("/sdapi/v1/txt2img", json={**small, "prompt": prompt})
                assert r.status_code == 200, r.text
                return parse_infotext(info(r)["infotexts"][0])[2].get("TI hashes")

            listed = c.get("/sdapi/v1/embeddings").json()
            assert listed["loaded"] == {} and listed["skipped"]["inkstyle"]["shape"] == 1024
            assert ti_hashes("a photo of inkstyle <lora:ink:0.6>") == "inkstyle: ink"
            listed = c.get("/sdapi/v1/embeddings").json()
            assert listed["loaded"]["inkstyle"] == {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                                    "shape": 128, "vectors": 2}
            assert listed["skipped"]["inkstyle"]["shape"] == 1024
            assert c.post("/sdapi/v1/refresh-embeddings").status_code == 200  # (the file read again: still skipped)
            assert c.get("/sdapi/v1/embeddings").json() == listed
            r = c.post("/sdapi/v1/txt2img", json={**small, "prompt": "a photo of inkstyle"})  # (the LoRA unmerged)
            assert r.status_code == 422 and r.json()["detail"].startswith("inkstyle.pt: an embedding of width 1024")
            assert str(embs) not in r.text
            assert c.get("/sdapi/v1/embeddings").json()["loaded"] == {}
            r = c.post("/sdapi/v1/txt2img", json={**small, "prompt": "a cat", "batch_size": 2, "enable_hr": True,
                                                  "hr_scale": 1.5, "denoising_strength": 0.5, "override_settings": {
                                                      "sd_model_checkpoint": "random:tiny-inpainting",
                                                      "inpainting_mask_weight": 0.5}})
            assert r.status_code == 200 and len(r.json()["images"]) == 2, r.text
            r = c.post("/sdapi/v1/img2img", json={**small, "prompt": "a cat", "batch_size": 2, "init_images": [
                png_b64(_noise_image(seed=1)), png_b64(_noise_image(seed=2))], "denoising_strength": 0.6,
                "override_settings": {"sd_model_checkpoint": "random:tiny-inpainting"}})
            assert r.status_code == 200 and len(r.json()["images"]) == 2, r.text
    finally:
        server.stop()


def test_batch_job_counts_its_prompt_with_its_own_loras_bundled_embeddings(tmp_path):
    """fastsd.batch: a worker counts a job's prompt (its chunks, batching) with the job's LoRAs applied, so the bundled
    embedding of a job's LoRA takes the name of an unusable embedding file (as the pipeline and A1111 do), and a job
    without the LoRA still fails on that file alone."""
    import os

    from fastsd.batch import Defaults, run
    from PIL import Image

    loras, embs = tmp_path / "loras", tmp_path / "embs"
    loras.mkdir()
    embs.mkdir()
    bundle(loras / "ink.safetensors", tiny(), {"inkstyle": {"emb_params": vectors(2, 4)}})
    torch.save({"string_to_param": {"*": torch.randn(2, 1024)}}, embs / "inkstyle.pt")
    jobs = [{"prompt": "a photo of inkstyle", "seed": 1, "id": "none"},
            {"prompt": "a photo of inkstyle <lora:ink:0.7>", "seed": 1, "id": "tag"}]
    out = str(tmp_path / "out")
    rows = run(jobs, out=out, model="random:tiny", threads=1, progress=False, lora_dir=str(loras),
               embeddings_dir=str(embs), defaults=Defaults(steps=1, width=64, height=64))
    assert [r["status"] for r in rows] == ["failed", "done"], rows
    assert "inkstyle.pt: an embedding of width 1024" in rows[0]["error"]
    with Image.open(os.path.join(out, "tag.png")) as im:
        assert parse_infotext(im.text["parameters"])[2]["TI hashes"] == "inkstyle: ink"


def test_cli_word_only_inside_a_lora_tag_reads_no_embedding(tmp_path, capsys):
    """The CLI's early check of the embeddings a prompt names skips the <lora:...> tags, as the text encoder does:
    `a cat <lora:ink:1>` with an unusable (SD2) `ink.pt` in --embeddings-dir runs; `an ink cat` still names the file
    (exit 2, one line)."""
    from test_lora import CLI

    from fastsd.generate import main

    loras, embs = tmp_path / "loras", tmp_path / "embs"
    loras.mkdir()
    embs.mkdir()
    bundle(loras / "ink.safetensors", tiny(), {"inkstyle": {"emb_params": vectors(2, 4)}})
    torch.save({"string_to_param": {"*": torch.randn(2, 1024)}}, embs / "ink.pt")  # an SD2 embedding
    common = ["--lora-dir", str(loras), "--embeddings-dir", str(embs), *CLI]
    assert main(["a cat <lora:ink:1>", *common, "--out", str(tmp_path / "ok.png")]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["an ink cat <lora:ink:1>", *common, "--out", str(tmp_path / "bad.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ink.pt: an embedding of width 1024" in err[0], err
    assert not (tmp_path / "bad.png").exists()
