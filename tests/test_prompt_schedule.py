"""A1111's prompt editing ([from:to:when]) and alternating words ([a|b]): the schedules its prompt_parser documents,
the texts each model call sees (A1111's step counting), and the image against diffusers' pipeline fed the same
switch of prompt embeddings mid-run."""
import numpy as np
import pytest
import torch

from fastsd.prompt_schedule import at_call, prompt_schedule
from fastsd.samplers import prompt_steps

# A1111's modules/prompt_parser.py documents these (its doctests; steps 10, or (10, 10) for a hires pass). Its
# "a [{b|d{:.5] c" one ("not handling this right now") does not hold there either: A1111's grammar can't parse it
# with lark 1.1.2 (its pin) or 1.3, so that prompt is one text, as here.
A1111_SCHEDULES = [
    ("test", None, [(10, "test")]),
    ("a [b:3]", None, [(3, "a "), (10, "a b")]),
    ("a [b: 3]", None, [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", None, [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", None, [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", None, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", None, [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", None, [(10, "a [unbalanced")]),
    ("a [b:.5] c", None, [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", None, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", None, [(i, "a" if i % 2 else "(b:1.1)") for i in range(1, 11)]),
    ("[fe|]male", None, [(i, "female" if i % 2 else "male") for i in range(1, 11)]),
    ("[fe|||]male", None, [(i, "female" if i % 4 == 1 else "male") for i in range(1, 11)]),
    ("a [b:.5] c", 10, [(10, "a b c")]),
    ("a [b:1.5] c", 10, [(5, "a  c"), (10, "a b c")]),
]


@pytest.mark.parametrize("prompt,hires,want", A1111_SCHEDULES)
def test_a1111_documented_schedules(prompt, hires, want):
    assert prompt_schedule(prompt, 10, hires) == want


def test_a1111_example_and_when():
    """A1111's example at 100 steps; a `when` with a decimal point is a fraction (1.0: the whole pass), one without a
    step count; in a hires pass (first pass 10 steps) a count above 10 or a fraction above 1 points into it."""
    p = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
         "[ in background:0.25] [shoddy:masterful:0.5]")
    assert prompt_schedule(p, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful")]
    assert prompt_schedule("a [b:c:1.0]", 10) == [(10, "a b")]
    assert prompt_schedule("a [b:c:2]", 10, 10) == [(10, "a c")]
    assert prompt_schedule("a [b:c:12]", 10, 10) == [(2, "a b"), (10, "a c")]
    assert prompt_schedule("plain (emphasis:1.2) <lora:x:0.5>", 10) == [(10, "plain (emphasis:1.2) <lora:x:0.5>")]
    deep = "[" * 300 + "a" + "]" * 300  # deeper than Python's recursion: kept as text (no traceback), as unparsable
    assert prompt_schedule(deep, 10) == [(10, deep)]
    sched = prompt_schedule("a [b:c:3]", 10)  # A1111 reads entry i for the calls up to its last step, from call 0
    assert [at_call(sched, c) for c in range(6)] == ["a b"] * 4 + ["a c"] * 2
    assert prompt_steps("Heun", 4) == prompt_steps("dpmpp_sde_karras", 4) == 8 and prompt_steps("euler_a", 4) == 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from test_pipeline import make_models

    from fastsd import load_pipeline
    from fastsd.config import TINY

    root = tmp_path_factory.mktemp("tiny")
    models = make_models(TINY, root)
    return models, load_pipeline(str(root), device="cpu", dtype="fp32", backend="torch")


def _texts_seen(pipe, monkeypatch, texts, **kw):
    """The cond (and uncond) text of each UNet call of pipe.generate(**kw), told apart by their encodings."""
    enc = {t: pipe.encode_prompt([t], None)[0][0] for t in texts}
    seen = []
    forward = pipe.unet.forward

    def recording(x, t, context, *a, **k):
        names = [next((n for n, e in enc.items() if torch.equal(e, c)), "?") for c in context]
        seen.append(names[0] if len(names) == 1 else tuple(names))
        return forward(x, t, context, *a, **k)

    monkeypatch.setattr(pipe.unet, "forward", recording)
    pipe.generate(seed=1, width=32, height=32, progress=False, **kw)
    monkeypatch.undo()
    return seen


def test_each_model_call_sees_a1111s_text(tiny, monkeypatch):
    """Euler counts steps; Heun (A1111's second order) counts twice the steps and schedules over its model calls;
    alternation starts with two calls of the first word (call 0 and 1 read step 1's); the negative prompt is
    scheduled too; guidance 1 has no uncond; the hires fix's second pass restarts the count, its fractions above 1
    pointing into it."""
    _, pipe = tiny
    t = ["a cat", "a dog", "a ", "ugly", "blurry", "a big cat"]
    seen = _texts_seen(pipe, monkeypatch, t, prompt="a [cat:dog:0.5]", steps=4, sampler="euler", guidance_scale=1)
    assert seen == ["a cat"] * 3 + ["a dog"]
    seen = _texts_seen(pipe, monkeypatch, t, prompt="a [cat:dog:0.5]", steps=4, sampler="heun", guidance_scale=1)
    assert seen == ["a cat"] * 5 + ["a dog"] * 2  # 7 calls; steps 8, switch after call 4
    seen = _texts_seen(pipe, monkeypatch, t, prompt="a [cat|dog]", steps=5, sampler="euler", guidance_scale=1)
    assert seen == ["a cat", "a cat", "a dog", "a cat", "a dog"]
    seen = _texts_seen(pipe, monkeypatch, t, prompt="a [cat:4]", negative_prompt="[ugly:blurry:0.5]", steps=6,
                       sampler="euler", guidance_scale=5)
    assert seen == [("ugly", "a ")] * 4 + [("blurry", "a ")] + [("blurry", "a cat")]
    seen = _texts_seen(pipe, monkeypatch, t, prompt="a [cat:dog:1.5]", steps=3, sampler="euler", guidance_scale=1,
                       hires_scale=1.5, hires_steps=4, hires_strength=1.0)
    assert seen == ["a cat"] * 3 + ["a cat"] * 3 + ["a dog"]  # the second pass: 4 steps, dog after call 2
    seen = _texts_seen(pipe, monkeypatch, t, prompt="a [cat:dog:2]", steps=3, sampler="euler", guidance_scale=1,
                       hires_scale=1.5, hires_steps=4, hires_strength=1.0, hires_prompt="a big cat")
    assert seen == ["a cat"] * 3 + ["a big cat"] * 4  # a hires prompt without editing: its own text throughout


def test_plain_prompts_encode_as_before(tiny):
    """Without '[' nothing changes (the same tensors as without steps); a scheduled branch is a ScheduledContext
    whose rows are the texts' own encodings."""
    from fastsd.denoisers import ScheduledContext

    _, pipe = tiny
    plain = pipe.encode_prompt(["a cat", "a dog"], ["ugly", ""])
    assert all(torch.equal(a, b) for a, b in zip(plain, pipe.encode_prompt(["a cat", "a dog"], ["ugly", ""], steps=10)))
    cond, uncond = pipe.encode_prompt(["a [cat:dog:5]", "an owl"], ["ugly", "ugly"], steps=10)
    assert isinstance(cond, ScheduledContext) and isinstance(uncond, torch.Tensor)
    owl, cat, dog = (pipe.encode_prompt([t], None)[0][0] for t in ("an owl", "a cat", "a dog"))
    assert torch.equal(cond.at(5)[0], cat) and torch.equal(cond.at(6)[0], dog) and torch.equal(cond.at(9)[1], owl)


def test_prompt_editing_matches_diffusers_switching_embeddings(tiny):
    """diffusers' StableDiffusionPipeline with the prompt embeddings of one text replaced by another's after its
    second step (callback_on_step_end): the image of fastsd's "a [photo of a cat:red car on a road:0.25]" at 4 Euler
    steps (calls 0-1 the first text, 2-3 the second). The tiny model's image moves little with its text (the same
    run without the switch is 65 dB from it on an AVX-512 VM, the two runs 89 dB apart), so the comparison is held
    that close."""
    from test_pipeline import NEG, diffusers_pipe

    from fastsd.image import psnr

    models, pipe = tiny
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sp = diffusers_pipe(models, "euler")
    first, neg = sp.encode_prompt("a photo of a cat", "cpu", 1, True, negative_prompt=NEG)
    second, _ = sp.encode_prompt("a red car on a road", "cpu", 1, True, negative_prompt=NEG)

    def switch(p, i, t, kw):
        return {"prompt_embeds": torch.cat([neg, second])} if i == 1 else {}

    run = dict(num_inference_steps=4, guidance_scale=7.5, height=64, width=64, output_type="np")
    ref, unswitched = (sp(prompt_embeds=first, negative_prompt_embeds=neg, latents=latents.clone(), **run, **cb)
                       .images[0] for cb in (dict(callback_on_step_end=switch,
                                                  callback_on_step_end_tensor_inputs=["prompt_embeds"]), {}))
    ours = pipe.generate("a [photo of a cat:red car on a road:0.25]", negative_prompt=NEG, steps=4, sampler="euler",
                         width=64, height=64, latents=latents, progress=False)[0]
    to8 = lambda a: (a * 255).round().astype(np.uint8)  # noqa: E731
    assert np.asarray(ours).std() > 5
    assert psnr(ours, to8(ref)) >= 75 and psnr(ours, to8(unswitched)) <= psnr(ours, to8(ref)) - 15


def test_batch_jobs_with_prompt_editing_are_generates_images(tmp_path):
    """fastsd.batch: a job whose prompt edits, batched with one that doesn't (--batch 2 --always-batch), and a hires
    job whose edit points into its second pass: each PNG is Pipeline.generate's for its settings."""
    import json

    from test_batch import _generated_png, _png_bytes, write

    import fastsd
    from fastsd.batch.__main__ import main

    records = [{"prompt": "a [cat:dog:0.5]", "negative_prompt": "[ugly|blurry]", "seed": 1, "id": "edit"},
               {"prompt": "an owl", "negative_prompt": "ugly!", "seed": 2, "id": "plain"},
               {"prompt": "a [cat:dog:1.5]", "seed": 3, "id": "hires", "hires_scale": 1.5, "hires_steps": 2}]
    jobs = write(tmp_path / "jobs.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    out = str(tmp_path / "out")
    assert main([jobs, "--model", "random:tiny", "--out", out, "--steps", "3", "--width", "32", "--height", "32",
                 "--batch", "2", "--always-batch", "--no-progress"]) == 0
    pipe = fastsd.load_pipeline("random:tiny")
    pngs = _png_bytes(out)
    for r in records:
        kw = {k: v for k, v in r.items() if k != "id"}
        assert pngs[f"{r['id']}.png"] == _generated_png(pipe, steps=3, width=32, height=32, **kw), r["id"]


# ---- composable prompts (AND) ----------------------------------------------------------------------------------

def test_split_and_as_a1111():
    from fastsd.prompt_schedule import split_and

    assert split_and("a cat AND a dog :0.6") == [("a cat", 1.0), (" a dog", 0.6)]
    assert split_and("photo of a cat:1.5") == [("photo of a cat", 1.5)]  # A1111 reads a weight without AND too
    assert split_and("a (cat:1.2)") == [("a (cat:1.2)", 1.0)] and split_and("ANDROID and") == [("ANDROID and", 1.0)]
    assert split_and("x AND  y: -1 ") == [("x", 1.0), ("  y", -1.0)]


def _combine_a1111(uncond, parts, owners, weights, scale):
    """A1111's combine_denoised (transcribed; a test oracle): uncond + sum over an image's parts of
    weight * scale * (part - uncond)."""
    out = uncond.clone()
    for r, (i, w) in enumerate(zip(owners, weights)):
        out[i] = out[i] + (parts[r] - uncond[i]) * (w * scale)
    return out


def test_cfg_denoiser_composes_parts():
    """A batch of 2: image 0 with two parts (weights 1, 0.5), image 1 with one part of weight 0.8; each branch row
    is the fake denoiser's output for its own x and context. Guided: A1111's combine_denoised; unguided: the first
    part stands for the uncond (A1111's skip_uncond, scale 1)."""
    from fastsd.denoisers import CFGDenoiser, ScheduledContext

    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)  # rows: part a, part b, part c, negative
    x = torch.randn(2, 4, 2, 2, generator=g, dtype=torch.float64)
    calls = []

    def fake(x_in, sigma, context):
        calls.append(x_in.shape[0])
        return x_in * 0.5 + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    cond = ScheduledContext(ctx, [[(1.0, [(10, 0)]), (0.5, [(10, 1)])], [(0.8, [(10, 2)])]])
    uncond = ScheduledContext(ctx, [[(1.0, [(10, 3)])], [(1.0, [(10, 3)])]])
    den = CFGDenoiser(fake, cond, uncond, 7.0)
    u_x0, c_x0, scale = den.split_guidance(x, torch.tensor(1.0))
    part = lambda i, r: fake(x[i:i + 1], None, ctx[r:r + 1])[0]  # noqa: E731
    parts = torch.stack([part(0, 0), part(0, 1), part(1, 2)])
    uncond_x0 = torch.stack([part(0, 3), part(1, 3)])
    want = _combine_a1111(uncond_x0, parts, [0, 0, 1], [1.0, 0.5, 0.8], 7.0)
    assert torch.allclose(u_x0 + scale * (c_x0 - u_x0), want, atol=1e-12) and calls[0] == 5  # one call, 2 + 3 rows
    assert torch.allclose(den(x, torch.tensor(1.0)), want, atol=1e-12)
    alone = CFGDenoiser(fake, cond, None, 1.0)(x, torch.tensor(1.0))
    first = torch.stack([parts[0], parts[2]])
    assert torch.allclose(alone, _combine_a1111(first, parts, [0, 0, 1], [1.0, 0.5, 0.8], 1.0), atol=1e-12)


def test_and_prompt_image_is_a1111s_combination(tiny):
    """"a photo of a cat AND a red car :0.5" at 4 Euler steps, guidance 7.5: the image of the same sampler over a
    model that calls the UNet once per branch and combines them by A1111's formula (the oracle above); a weight
    suffix alone weighs the guidance ("a cat :1" is "a cat"; ":0.5" is not)."""
    from test_pipeline import NEG

    from fastsd.denoisers import EpsDenoiser
    from fastsd.image import psnr, tensor_to_pil
    from fastsd.samplers import get_sampler
    from fastsd.schedules import alphas_cumprod

    _, pipe = tiny
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(negative_prompt=NEG, steps=4, sampler="euler", width=64, height=64, latents=latents, progress=False)
    ours = pipe.generate("a photo of a cat AND a red car :0.5", **kw)[0]
    enc = {t: pipe.encode_prompt([t], None)[0] for t in ("a photo of a cat", " a red car", NEG)}
    sched = pipe.schedule("euler", 4, "automatic")
    den = EpsDenoiser(lambda x, t, context: pipe.unet(x, t, context), alphas_cumprod(pipe.config.scheduler),
                      schedule=sched)

    def model(x, sigma):
        u = den(x, sigma, context=enc[NEG])
        parts = torch.cat([den(x, sigma, context=enc[t]) for t in ("a photo of a cat", " a red car")])
        return _combine_a1111(u, parts, [0, 0], [1.0, 0.5], 7.5)

    with torch.no_grad():
        x = get_sampler("euler")(model, latents * sched.init_noise_sigma, sched.sigmas, disable=True)
        ref = tensor_to_pil(pipe.decode(x * sched.out_scale))[0]
    assert np.asarray(ours).std() > 5 and psnr(ours, ref) >= 60
    plain = pipe.generate("a photo of a cat", **kw)[0]
    assert psnr(ours, plain) < psnr(ours, ref) - 10
    assert np.array_equal(np.asarray(pipe.generate("a photo of a cat :1", **kw)[0]), np.asarray(plain))
    two = pipe.generate("a photo of a cat AND a red car :0.5", **{**kw, "latents": None}, seed=5, num_images=2)
    alone = pipe.generate("a photo of a cat AND a red car :0.5", **{**kw, "latents": None}, seed=6)[0]
    diff = np.abs(np.asarray(two[1], dtype=int) - np.asarray(alone, dtype=int))  # one prompt over a batch: each
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # image composes its own parts (the batch-seed rule)
    assert not np.array_equal(np.asarray(pipe.generate("a photo of a cat :0.5", **kw)[0]), np.asarray(plain))


# ---- A1111's Negative Guidance minimum sigma (s_min_uncond, "NGMS") ------------------------------------------------

def test_ngms_skips_the_uncond_on_odd_calls_below_the_sigma():
    """Calls 0..5 at sigmas 5, 4, 0.9, 0.8, 0.7, 0.6 with s_min_uncond 1: the odd calls below 1 (3 and 5) run the
    cond alone and return its x0 (A1111's skip: the cond stands for the uncond, scale 1); through split_guidance
    (None, then the sampler's plain call) and through a direct call alike."""
    from fastsd.denoisers import CFGDenoiser

    rows = []

    def fake(x_in, sigma, context):
        rows.append(x_in.shape[0])
        return x_in * 0.5 + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    g = torch.Generator().manual_seed(0)
    x, c, u = torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    den = CFGDenoiser(fake, c, u, 7.0, s_min_uncond=1.0)
    outs = []
    for sigma in (5.0, 4.0, 0.9, 0.8, 0.7, 0.6):
        split = den.split_guidance(x, torch.tensor(sigma, dtype=torch.float64))
        outs.append(split if split is not None else den(x, torch.tensor(sigma, dtype=torch.float64)))
    assert rows == [4, 4, 4, 2, 4, 2]
    assert torch.equal(outs[3], fake(x, None, c)) and isinstance(outs[2], tuple)
    direct = CFGDenoiser(fake, c, u, 7.0, s_min_uncond=1.0)
    rows.clear()
    for sigma in (5.0, 4.0, 0.9, 0.8):
        direct(x, sigma)
    assert rows == [4, 4, 4, 2]


UNCOND_KW = dict(prompt="a cat", negative_prompt="ugly", steps=10, sampler="euler_a", seed=4, width=32, height=32,
                 progress=False)


def _record_batches(pipe, monkeypatch) -> list[int]:
    """The batch size of every UNet call from now on (the list fills as the pipeline runs)."""
    batches, forward = [], pipe.unet.forward

    def recording(x, t, context, *a, **k):
        batches.append(x.shape[0])
        return forward(x, t, context, *a, **k)

    monkeypatch.setattr(pipe.unet, "forward", recording)
    return batches


def test_ngms_in_a_generation(tiny, monkeypatch):
    """Euler a, 10 steps, s_min_uncond 3: the UNet runs at batch 1 (no uncond) exactly on the odd calls whose sigma
    is below 3; the image changes, the infotext says "NGMS: 3.0"; s_min_uncond 0 is the plain run."""
    from fastsd.schedules import schedule_for

    _, pipe = tiny
    kw = UNCOND_KW
    plain = pipe.generate(**kw)[0]
    batches = _record_batches(pipe, monkeypatch)
    ngms = pipe.generate(**kw, s_min_uncond=3.0)[0]
    sigmas = schedule_for("euler_a", 10).sigmas.tolist()
    assert batches == [1 if i % 2 and sigmas[i] < 3 else 2 for i in range(10)] and batches.count(1) >= 2
    assert "NGMS: 3.0" in ngms.info["parameters"] and "NGMS" not in plain.info["parameters"]
    assert not np.array_equal(np.asarray(ngms), np.asarray(plain))
    monkeypatch.undo()
    assert np.array_equal(np.asarray(pipe.generate(**kw, s_min_uncond=0.0)[0]), np.asarray(plain))
    with pytest.raises(ValueError, match="s_min_uncond must be >= 0"):
        pipe.generate(**kw, s_min_uncond=-1.0)


# ---- A1111's "NGMS all steps" (s_min_uncond_all) and "Skip Early CFG" (skip_early_cond) ----------------------------

def _fake_unet(rows):
    def fake(x_in, sigma, context):
        rows.append(x_in.shape[0])
        return x_in * 0.5 + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    return fake


def test_ngms_all_steps_and_skip_early_cfg_choose_calls_as_a1111():
    """A transcription of A1111 1.10's rule (sd_samplers_cfg_denoiser.py): a call (index from 0 of total_steps)
    skips the uncond when skip_early_cond != 0 and index / total_steps <= skip_early_cond, or when (index is odd or
    s_min_uncond_all) and s_min_uncond > 0 and sigma < s_min_uncond. Every combination, over 10 calls, by the batch
    rows each call ran; a skipped call returns the cond's x0 (A1111 combines with scale 1)."""
    from fastsd.denoisers import CFGDenoiser

    g = torch.Generator().manual_seed(1)
    x, c, u = torch.randn(1, 4, 2, 2, generator=g), torch.randn(1, 3, 5, generator=g), torch.randn(1, 3, 5, generator=g)
    sigmas = [9.0, 7.0, 5.0, 3.5, 2.5, 1.5, 0.9, 0.5, 0.2, 0.1]
    for skip_early in (0.0, 0.1, 0.25, 0.5, 1.0):
        for s_min, every in ((0.0, False), (0.0, True), (2.0, False), (2.0, True)):
            rows = []
            den = CFGDenoiser(_fake_unet(rows), c, u, 5.0, s_min_uncond=s_min, s_min_uncond_all=every,
                              skip_early=skip_early, total_calls=len(sigmas))
            for step, sigma in enumerate(sigmas):
                skip = (skip_early != 0 and step / len(sigmas) <= skip_early) or \
                    ((step % 2 or every) and s_min > 0 and sigma < s_min)
                got = den(x, sigma)
                assert rows[-1] == (1 if skip else 2), (skip_early, s_min, every, step)
                if skip:
                    assert torch.equal(got, _fake_unet([])(x, None, c))
            if skip_early == 1.0:
                assert rows == [1] * 10


def test_skip_early_cfg_and_ngms_all_steps_in_a_generation(tiny, monkeypatch):
    """Euler a, 10 steps: skip_early_cond 0.25 runs calls 0-2 at batch 1 (A1111: 0/10, 1/10, 2/10 <= 0.25), Heun
    (second order, A1111 counts 2 x 10 steps) its calls 0-5; s_min_uncond 3 with s_min_uncond_all every call below
    sigma 3. The infotext says "Skip Early CFG: 0.25" / "NGMS: 3.0, NGMS all steps: True" and reads back; off, the
    plain run; unguided (cfg 1) they change nothing and are not written; bad values are refused by name."""
    from fastsd.infotext_settings import settings_from_infotext
    from fastsd.schedules import schedule_for

    _, pipe = tiny
    kw = UNCOND_KW
    plain = pipe.generate(**kw)[0]
    batches = _record_batches(pipe, monkeypatch)
    early = pipe.generate(**kw, skip_early_cond=0.25)[0]
    assert batches == [1, 1, 1] + [2] * 7
    batches.clear()
    heun = pipe.generate(**{**kw, "sampler": "heun"}, skip_early_cond=0.25)[0]
    assert batches[:6] == [1] * 6 and set(batches[6:]) == {2}
    batches.clear()
    every = pipe.generate(**kw, s_min_uncond=3.0, s_min_uncond_all=True)[0]
    sigmas = schedule_for("euler_a", 10).sigmas.tolist()
    assert batches == [1 if sigmas[i] < 3 else 2 for i in range(10)] and 0 < batches.count(1) < 10
    monkeypatch.undo()
    assert "Skip Early CFG: 0.25" in early.info["parameters"] and "Skip Early CFG" in heun.info["parameters"]
    assert "NGMS: 3.0, NGMS all steps: True" in every.info["parameters"]
    assert settings_from_infotext(every.info["parameters"])[0]["s_min_uncond_all"] is True
    assert settings_from_infotext(early.info["parameters"])[0]["skip_early_cond"] == 0.25
    for img in (early, every):
        assert not np.array_equal(np.asarray(img), np.asarray(plain))
    assert np.array_equal(np.asarray(pipe.generate(**kw, skip_early_cond=0.0, s_min_uncond_all=True)[0]),
                          np.asarray(plain))  # (NGMS all steps does nothing without s_min_uncond)
    unguided = dict(kw, guidance_scale=1.0)
    off = pipe.generate(**unguided)[0]
    on = pipe.generate(**unguided, skip_early_cond=0.5, s_min_uncond=3.0, s_min_uncond_all=True)[0]
    assert np.array_equal(np.asarray(on), np.asarray(off))
    assert "Skip Early CFG" not in on.info["parameters"] and "NGMS" not in on.info["parameters"]
    with pytest.raises(ValueError, match=r"skip_early_cond must be in \[0, 1\]"):
        pipe.generate(**kw, skip_early_cond=1.5)
    with pytest.raises(TypeError, match="s_min_uncond_all must be True or False"):
        pipe.generate(**kw, s_min_uncond_all="yes")
