"""Generation against diffusers' pipelines (same random weights, same noise), seeds, inpainting, VAE."""
import numpy as np
import pytest
import torch
from oracles import A1111Img2Img, save_diffusers_folder
from PIL import Image

from fastsd import load_pipeline
from fastsd.config import SD15, TINY
from fastsd.image import parse_infotext, psnr

from fastsd.testing import diffusers_scheduler as scheduler  # noqa: E402  (fastsd sampler -> its diffusers twin)


def make_models(cfg, root):
    from importlib.resources import files

    from transformers import CLIPTokenizer

    unet, vae, clip = save_diffusers_folder(cfg, root)
    assets = files("fastsd") / "assets"
    tok = CLIPTokenizer(str(assets / "vocab.json"), str(assets / "merges.txt"), model_max_length=77)
    return unet, vae, clip, tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    unet, vae, clip, tok = make_models(TINY, root)
    return root, (unet, vae, clip, tok), load_pipeline(str(root), device="cpu", dtype="fp32", backend="torch")


def diffusers_pipe(models, sampler, img2img=False):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    unet, vae, clip, tok = models
    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=clip, tokenizer=tok, unet=unet, scheduler=scheduler(sampler),
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return A1111Img2Img(pipe) if img2img else pipe


PROMPT, NEG = "a photo of an astronaut riding a horse, (detailed)", "blurry, lowres"


def assert_same_image(ours: Image.Image, ref: np.ndarray, min_psnr=40.0):
    ref8 = (ref * 255).round().astype(np.uint8)
    assert np.asarray(ours).std() > 5, "degenerate image: the comparison would prove nothing"
    assert psnr(ours, ref8) >= min_psnr


def run_txt2img(pipe, models, sampler, size, steps):
    h, w = size if isinstance(size, tuple) else (size, size)
    f = pipe.config.vae.downscale
    latents = torch.randn(1, 4, h // f, w // f, generator=torch.Generator().manual_seed(3))
    prompt = PROMPT.replace("(detailed)", "detailed")  # diffusers has no emphasis syntax
    ours = pipe.generate(prompt, negative_prompt=NEG, steps=steps, sampler=sampler, width=w, height=h,
                         latents=latents, progress=False)[0]
    ref = diffusers_pipe(models, sampler)(prompt, negative_prompt=NEG, num_inference_steps=steps, guidance_scale=7.5,
                                          height=h, width=w, latents=latents.clone(), output_type="np").images[0]
    assert_same_image(ours, ref)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "heun", "dpmpp_2m", "dpmpp_2m_karras", "euler_karras", "lms",
                                     "dpm2_karras", "unipc"])
def test_txt2img_matches_diffusers(tiny, sampler):
    _, models, pipe = tiny
    run_txt2img(pipe, models, sampler, 64, 8)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_txt2img_sides_of_any_multiple_of_8(tiny, backend):
    """56 x 72 px: latents 7 x 9 halve to odd sizes in the UNet (A1111 and diffusers take any multiple of 8)."""
    root, models, _ = tiny
    pipe = load_pipeline(str(root), device="cpu", dtype="fp32", backend=backend)
    run_txt2img(pipe, models, "euler", (56, 72), 4)


def run_img2img(pipe, models, sampler, size, steps, strength):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).filter(
        __import__("PIL.ImageFilter").ImageFilter.GaussianBlur(2))
    ours = pipe.generate(PROMPT.replace("(detailed)", "detailed"), negative_prompt=NEG, steps=steps, sampler=sampler,
                         image=img, strength=strength, seed=11, progress=False)[0]
    ref = diffusers_pipe(models, sampler, img2img=True)(
        PROMPT.replace("(detailed)", "detailed"), negative_prompt=NEG, image=img, strength=strength,
        num_inference_steps=steps, guidance_scale=7.5, generator=torch.Generator().manual_seed(11),
        output_type="np").images[0]
    assert_same_image(ours, ref)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "heun", "dpmpp_2m", "dpmpp_2m_karras", "heun_karras", "dpm2",
                                     "dpm2_a_karras"])
def test_img2img_matches_diffusers(tiny, sampler):
    _, models, pipe = tiny
    run_img2img(pipe, models, sampler, 64, 10, 0.6)


@pytest.mark.parametrize("img2img", [False, True])
def test_dpmpp_sde_karras_matches_diffusers_brownian_tree(tiny, img2img):
    """DPM++ SDE Karras draws its noise from a torchsde Brownian tree of each image's seed over the whole schedule
    (A1111's); diffusers' DPMSolverSDEScheduler(noise_sampler_seed=seed) from that same tree at batch 1, so the
    images match, for img2img too (both trees span the full schedule, not its tail). A seed one off does not."""
    _, models, pipe = tiny
    prompt = PROMPT.replace("(detailed)", "detailed")
    kw = dict(negative_prompt=NEG, guidance_scale=7.5)
    if img2img:
        rng = np.random.default_rng(0)
        img = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).filter(
            __import__("PIL.ImageFilter").ImageFilter.GaussianBlur(2))
        ours = lambda seed: pipe.generate(prompt, steps=10, sampler="DPM++ SDE Karras", image=img,  # noqa: E731
                                          strength=0.6, seed=seed, progress=False, **kw)[0]
        ref_pipe = diffusers_pipe(models, "dpmpp_sde_karras", img2img=True)
        call = dict(image=img, strength=0.6, num_inference_steps=10, generator=torch.Generator().manual_seed(11))
    else:
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        ours = lambda seed: pipe.generate(prompt, steps=8, sampler="DPM++ SDE Karras", width=64,  # noqa: E731
                                          height=64, latents=latents, seed=seed, progress=False, **kw)[0]
        ref_pipe = diffusers_pipe(models, "dpmpp_sde_karras")
        call = dict(num_inference_steps=8, height=64, width=64, latents=latents.clone())
    assert type(ref_pipe.scheduler).__name__ == "DPMSolverSDEScheduler" and ref_pipe.scheduler.config.use_karras_sigmas
    ref_pipe.scheduler.noise_sampler_seed = 11
    ref = ref_pipe(prompt, output_type="np", **kw, **call).images[0]
    assert_same_image(ours(11), ref)
    assert psnr(ours(12), (ref * 255).round().astype(np.uint8)) < 35


def with_a1111_brownian_noise(ref_pipe, shape, seeds):
    """diffusers' pipeline with its scheduler's step noise taken from A1111's: k-diffusion's BrownianTreeNoiseSampler
    (diffusers' copy) over the full schedule's nonzero sigmas, one tree per image seeded by its seed, asked for
    noise(sigma, sigma_next) at each step (A1111's create_noise_sampler for its "brownian_noise" samplers)."""
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    sched, step = ref_pipe.scheduler, ref_pipe.scheduler.step
    trees = []

    def noisy_step(out, t, sample, **kw):
        sig = sched.sigmas
        if not trees:
            trees.append(BrownianTreeNoiseSampler(torch.zeros(shape), sig[sig > 0].min(), sig.max(), seed=seeds))
        i = sched.step_index if sched.step_index is not None else sched.begin_index or 0
        noise = trees[0](sig[i], sig[i + 1]) if sig[i + 1] > 0 else torch.zeros(shape)
        return step(out, t, sample, **{**kw, "variance_noise": noise})

    sched.step = noisy_step
    return ref_pipe


@pytest.mark.parametrize("sampler,img2img", [("dpmpp_2m_sde_karras", False), ("dpmpp_2m_sde_karras", True),
                                             ("dpmpp_2m_sde_heun", False)])
def test_2m_sde_runs_on_a1111_brownian_noise(tiny, sampler, img2img):
    """DPM++ 2M SDE (Heun) draw A1111's noise, a Brownian tree per image seeded by its seed over the full schedule
    (img2img: not its tail), not diffusers' fresh normals: diffusers' twin given that noise makes the same image; a
    seed one off does not."""
    _, models, pipe = tiny
    prompt = PROMPT.replace("(detailed)", "detailed")
    kw = dict(negative_prompt=NEG, guidance_scale=7.5)
    if img2img:
        rng = np.random.default_rng(0)
        img = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        ours = lambda seed: pipe.generate(prompt, steps=10, sampler=sampler, image=img, strength=0.6,  # noqa: E731
                                          seed=seed, progress=False, **kw)[0]
        call = dict(image=img, strength=0.6, num_inference_steps=10, generator=torch.Generator().manual_seed(11))
    else:
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        ours = lambda seed: pipe.generate(prompt, steps=8, sampler=sampler, width=64, height=64,  # noqa: E731
                                          latents=latents, seed=seed, progress=False, **kw)[0]
        call = dict(num_inference_steps=8, height=64, width=64, latents=latents.clone())
    ref_pipe = with_a1111_brownian_noise(diffusers_pipe(models, sampler, img2img=img2img), (1, 4, 8, 8), [11])
    ref = ref_pipe(prompt, output_type="np", **kw, **call).images[0]
    assert_same_image(ours(11), ref)
    assert psnr(ours(12), (ref * 255).round().astype(np.uint8)) < 35


@pytest.mark.slow
def test_sd15_txt2img_and_img2img_match_diffusers(tmp_path):
    unet, vae, clip, tok = make_models(SD15, tmp_path)
    pipe = load_pipeline(str(tmp_path), device="cpu", dtype="fp32", backend="torch")
    run_txt2img(pipe, (unet, vae, clip, tok), "dpmpp_2m_karras", 128, 4)
    run_img2img(pipe, (unet, vae, clip, tok), "euler", 128, 4, 0.5)


# ---- seeds, batches -----------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_sde_karras", "dpmpp_3m_sde"])  # per-image generators; trees
def test_same_seed_same_image_and_batch_seed_rule(tiny, sampler):
    _, _, pipe = tiny
    kw = dict(steps=3, sampler=sampler, width=32, height=48, progress=False)
    batch = pipe.generate("a cat", seed=5, num_images=3, **kw)
    again = pipe.generate("a cat", seed=5, num_images=1, **kw)[0]
    third = pipe.generate("a cat", seed=7, num_images=1, **kw)[0]
    assert batch[0].size == (32, 48)
    for in_batch, alone in ((batch[0], again), (batch[2], third)):  # image i of a batch = seed + i alone, up to
        # rounding: bit-equal on the AMD VMs; on an Intel Xeon (AMX) one value of 4,608 was 1 apart (MKL/oneDNN
        # round a batch of 3 and one of 1 differently there)
        diff = np.abs(np.asarray(in_batch, dtype=int) - np.asarray(alone, dtype=int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert np.abs(np.asarray(batch[0], dtype=int) - np.asarray(batch[1], dtype=int)).mean() > 5  # seeds differ
    info = parse_infotext(batch[2].info["parameters"])
    assert info[2]["Seed"] == "7"


def test_infotext_round_trips(tiny):
    _, _, pipe = tiny
    im = pipe.generate("a (red:1.2) fox, forest\nsecond line", negative_prompt="ugly, blurry", steps=2,
                       guidance_scale=5.5, sampler="DPM++ 2M Karras", seed=42, width=32, height=32, progress=False)[0]
    prompt, neg, params = parse_infotext(im.info["parameters"])
    assert prompt == "a (red:1.2) fox, forest\nsecond line" and neg == "ugly, blurry"
    assert params["Steps"] == "2" and params["Sampler"] == "DPM++ 2M" and params["CFG scale"] == "5.5"
    assert params["Schedule type"] == "Karras"  # (A1111 1.9+'s split of "DPM++ 2M Karras")
    assert params["Seed"] == "42" and params["Size"] == "32x32" and params["Model"] == pipe.name
    assert params["RNG"] == "CPU"  # (A1111 reads a missing key as its GPU RNG)


def test_long_prompt_and_emphasis_change_the_conditioning(tiny):
    from fastsd.conditioning import encode_prompts

    _, _, pipe = tiny
    long = " ".join(["word"] * 100)  # 100 tokens -> two 75-token chunks
    ctx = encode_prompts(pipe.clip, pipe.tokenizer, [long, ""])
    assert ctx.shape == (2, 154, TINY.clip.hidden_size)
    plain = encode_prompts(pipe.clip, pipe.tokenizer, ["a red fox"])
    weighted = encode_prompts(pipe.clip, pipe.tokenizer, ["a (red:1.5) fox"])
    assert torch.equal(encode_prompts(pipe.clip, pipe.tokenizer, ["a (red:1) fox"]), plain)
    assert not torch.allclose(plain, weighted)
    assert torch.allclose(plain.mean(), weighted.mean(), atol=1e-5)  # A1111 restores the mean


# ---- inpainting, VAE -----------------------------------------------------------------------------------

@pytest.mark.parametrize("inpainting_model", [False, True])
def test_inpainting_keeps_the_known_region(tiny, monkeypatch, inpainting_model):
    """The final latents equal the image's own latents (the posterior's mean) outside the mask and differ inside, for
    a 9-channel inpainting model too (A1111 blends both). (Decoded pixels can't show this on random weights: the VAE
    decoder's attention mixes the whole image.)"""
    from fastsd.image import pil_to_tensor

    pipe = load_pipeline("random:tiny-inpainting", device="cpu", dtype="fp32") if inpainting_model else tiny[2]
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255  # repaint the right half
    seen = []
    decode = pipe.decode
    monkeypatch.setattr(pipe, "decode", lambda lat, tiled_vae=None: seen.append(lat) or decode(lat))
    pipe.generate("x", image=img, mask=Image.fromarray(mask), strength=1.0, steps=3, seed=0, progress=False)
    x0 = pipe.encode_images(pil_to_tensor(img), None)
    f = pipe.config.vae.downscale
    half = 32 // f
    assert torch.equal(seen[0][..., :half], x0[..., :half])
    assert (seen[0][..., half:] - x0[..., half:]).abs().mean() > 0.1


A1111_CASES = [(20, 0.75), (20, 0.5), (20, 0.3), (30, 0.04), (20, 0.04), (20, 0.0), (20, 1.0), (7, 0.999), (3, 0.5)]


@pytest.mark.parametrize("steps,strength", A1111_CASES)
def test_img2img_runs_a1111s_steps_from_the_seeds_first_draw(tiny, monkeypatch, steps, strength):
    """A1111's img2img (setup_img2img_steps, sample_img2img, transcribed): t_enc = int(min(strength, 0.999) * steps),
    the t_enc + 1 steps from sigmas[steps - t_enc - 1] of the full schedule, x = x0 + noise * that sigma with x0 the
    posterior's mean and noise the seed's first draw (ImageRNG.first); Euler a's step noise the draws after it."""
    import fastsd.pipeline as fp
    from fastsd.image import pil_to_tensor

    _, _, pipe = tiny
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    sigmas = pipe.schedule("euler_a", steps).sigmas
    t_enc = int(min(strength, 0.999) * steps)
    sigma_sched = sigmas[steps - t_enc - 1:]
    gen = torch.Generator().manual_seed(11)
    noise = torch.randn((1, 4, 4, 4), generator=gen)
    x0 = pipe.encode_images(pil_to_tensor(img), None)
    drawn, calls, seeded_noise = [], [], fp.seeded_noise
    monkeypatch.setattr(fp, "seeded_noise", lambda gens, shape, device: drawn.append(seeded_noise(gens, shape, device))
                        or drawn[-1])
    prepare = pipe.prepare_latents
    monkeypatch.setattr(pipe, "prepare_latents", lambda *a, **kw: calls.append(prepare(*a, **kw)) or calls[-1])
    pipe.generate("x", image=img, strength=strength, steps=steps, sampler="euler_a", seed=11, progress=False)
    x, sig = calls[0].x, calls[0].schedule.sigmas
    assert torch.equal(sig, sigma_sched) and len(sig) - 1 == t_enc + 1
    torch.testing.assert_close(x, x0 + noise * float(sigma_sched[0]), rtol=0, atol=1e-6)
    assert torch.equal(drawn[0], noise) and len(drawn) == t_enc + 1  # (no noise for the step to 0)
    assert all(torch.equal(d, torch.randn((1, 4, 4, 4), generator=gen)) for d in drawn[1:])


def test_inpainting_9_channel_model_runs():
    pipe = load_pipeline("random:tiny-inpainting", device="cpu")
    img = Image.new("RGB", (32, 32), (120, 30, 200))
    mask = Image.new("L", (32, 32), 255)
    out = pipe.generate("x", image=img, mask=mask, strength=1.0, steps=2, seed=0, progress=False)
    assert out[0].size == (32, 32)
    out = pipe.generate("x", steps=2, seed=0, width=32, height=32, progress=False)  # txt2img on an inpaint model
    assert out[0].size == (32, 32)


def test_tiled_vae_blends_to_the_untiled_result_on_local_ops():
    from fastsd.tiling import tiled

    x = torch.randn(1, 4, 40, 50)
    up = lambda t: torch.nn.functional.interpolate(t, scale_factor=8)  # noqa: E731
    assert torch.allclose(tiled(up, x, tile=16, overlap=4, scale=8), up(x), atol=1e-6)
    img = torch.randn(2, 3, 160, 200)
    down = lambda t: torch.nn.functional.avg_pool2d(t, 8)  # noqa: E731
    assert torch.allclose(tiled(down, img, tile=64, overlap=16, scale=1 / 8), down(img), atol=1e-6)


def test_forced_tiled_decode_is_close_to_untiled(tiny):
    _, _, pipe = tiny
    lat = torch.randn(1, 4, 80, 80, generator=torch.Generator().manual_seed(0))
    full = pipe.decode(lat, tiled_vae=False)
    tiles = pipe.decode(lat, tiled_vae=True)
    f = pipe.config.vae.downscale
    assert tiles.shape == full.shape == (1, 3, 80 * f, 80 * f)
    assert (tiles - full).abs().mean() < 0.1 * full.abs().mean()


def test_fp16_vae_nan_is_redone_in_fp32(monkeypatch):
    pipe = load_pipeline("random:tiny", device="cpu", dtype="fp16")
    decode = pipe.vae.decode

    def flaky(z):
        out = decode(z)
        return out * float("nan") if out.dtype == torch.float16 else out

    monkeypatch.setattr(pipe.vae, "decode", flaky)
    with pytest.warns(UserWarning, match="decoding again in fp32"):
        img = pipe.decode(torch.randn(1, 4, 8, 8))
    assert torch.isfinite(img).all()
    assert pipe.vae.dtype == torch.float16
