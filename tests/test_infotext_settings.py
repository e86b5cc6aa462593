"""--infotext (A1111's "PNG Info -> Send to txt2img"): an infotext's keys as GenerationSettings, the image made again
bit for bit from its own PNG, the command line winning over the infotext, one-line errors and warnings."""
import io
import sys

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from fastsd.generate import apply_infotext, build_parser, given_options, main
from fastsd.infotext_settings import InfotextError, model_mismatch, read_infotext, settings_from_infotext
from fastsd.settings import GenerationSettings

TINY = ["--model", "random:tiny", "--no-progress"]
# A1111 1.10.1's infotext, as it writes it (txt2img with the hires fix, a LoRA, clip skip 2)
A1111 = ("a photo of a cat <lora:detail:0.6>, (masterpiece:1.2)\n"
         "Negative prompt: blurry, lowres\n"
         "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x768, "
         "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, "
         "Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent (bicubic), "
         'Lora hashes: "detail: 0123456789ab", Version: v1.10.1')


def _text(path):
    with Image.open(path) as im:
        return im.text["parameters"], np.asarray(im.convert("RGB"))


# ---- the mapping ------------------------------------------------------------------------------------------


def test_a1111_infotext_maps_to_the_settings():
    kwargs, warnings = settings_from_infotext(A1111)
    assert kwargs == {"prompt": "a photo of a cat <lora:detail:0.6>, (masterpiece:1.2)",
                      "negative_prompt": "blurry, lowres", "steps": 20, "sampler": "dpmpp_2m_karras",
                      "schedule_type": "automatic", "guidance_scale": 7.0, "seed": 42, "width": 512, "height": 768,
                      "clip_skip": 2, "hires_scale": 2.0, "hires_steps": 10, "hires_upscaler": "Latent (bicubic)",
                      "hires_strength": 0.45, "randn_source": "GPU"}  # (no "RNG": A1111's default)
    assert warnings == []  # Model, Model hash, Lora hashes, Version only describe
    GenerationSettings(**kwargs).validate()

    short = ("Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x512, "
             "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1")
    kwargs, warnings = settings_from_infotext(short)
    assert kwargs == {"prompt": "", "negative_prompt": "", "steps": 20, "sampler": "dpmpp_2m_karras",
                      "schedule_type": "automatic", "guidance_scale": 7.0, "seed": 42, "width": 512, "height": 512,
                      "randn_source": "GPU"}
    assert warnings == []


@pytest.mark.parametrize("params, want", [
    ("Sampler: DPM++ 2M Karras", ("dpmpp_2m_karras", None)),  # before 1.9: the joint name
    ("Sampler: DPM++ 2M", ("dpmpp_2m", None)),  # no Schedule type: the sampler's own schedule (as before 1.9)
    ("Sampler: DPM++ 2M, Schedule type: Automatic", ("dpmpp_2m_karras", "automatic")),  # 1.9+'s Automatic
    ("Sampler: Euler, Schedule type: Karras", ("euler_karras", "automatic")),
    ("Sampler: Euler a, Schedule type: Exponential", ("euler_a", "exponential")),
    ("Sampler: DPM++ 2M, Schedule type: Align Your Steps", ("dpmpp_2m", "align_your_steps")),
    ("Sampler: DPM++ 2M SDE, Schedule type: Automatic", ("dpmpp_2m_sde", "exponential")),
    ("Sampler: UniPC, Schedule type: SGM Uniform", ("unipc", "sgm_uniform")),
])
def test_sampler_and_schedule_type(params, want):
    kwargs, warnings = settings_from_infotext(f"a cat\nSteps: 3, {params}, Seed: 1, Size: 64x64")
    assert (kwargs["sampler"], kwargs.get("schedule_type")) == want and warnings == []


def test_other_keys_hires_and_warnings():
    text = ("a dog\nSteps: 5, Sampler: Euler a, CFG scale: 4.5, Seed: 3, Face restoration: CodeFormer, "
            "Size: 64x48, Variation seed: 11, Variation seed strength: 0.25, Seed resize from: 128x96, ENSD: 31337, "
            "Schedule rho: 7, Denoising strength: 0.6, RNG: CPU")
    kwargs, warnings = settings_from_infotext(text)
    assert kwargs == {"prompt": "a dog", "negative_prompt": "", "steps": 5, "sampler": "euler_a",
                      "guidance_scale": 4.5, "seed": 3, "width": 64, "height": 48, "subseed": 11,
                      "subseed_strength": 0.25, "seed_resize_from_w": 128, "seed_resize_from_h": 96,
                      "strength": 0.6, "eta_noise_seed_delta": 31337, "randn_source": "CPU"}  # no hires keys: img2img's
    # strength
    assert warnings == ["infotext keys fastsd doesn't use, ignored: Face restoration, Schedule rho"]

    hires = ("a\nSteps: 4, Sampler: DPM++ 2M, Schedule type: Karras, Seed: 1, Size: 64x64, Denoising strength: 0.5, "
             "Hires sampler: Euler, Hires resize: 96x0, Hires upscaler: Lanczos")
    kwargs, warnings = settings_from_infotext(hires)
    assert (kwargs["sampler"], kwargs["hires_sampler"], kwargs["hires_strength"]) == \
        ("dpmpp_2m_karras", "euler_karras", 0.5)  # "Use same scheduler": Karras for the second pass too
    assert (kwargs["hires_width"], kwargs["hires_height"], kwargs["hires_scale"]) == (96, 0, 1.0)
    assert "strength" not in kwargs and warnings == []
    kwargs, warnings = settings_from_infotext("a\nSteps: 4, Sampler: DPM++ 2M SDE Exponential, Seed: 1, Size: 64x64, "
                                              "Mask blur: 4, Inpaint area: Only masked, Masked area padding: 32")
    assert (kwargs["sampler"], kwargs["schedule_type"]) == ("dpmpp_2m_sde", "exponential")  # (A1111 1.6-1.8's name)
    assert warnings == ["inpainting keys not read (Mask blur, Inpaint area, Masked area padding): give --mask-blur, "
                        "--inpaint-area, --inpaint-padding, --masked-content with --init-image and --mask"]
    kwargs, _ = settings_from_infotext(hires + ', Hires prompt: "a, b: c", Hires negative prompt: ugly')
    assert (kwargs["hires_prompt"], kwargs["hires_negative_prompt"]) == ("a, b: c", "ugly")


def test_skip_leaves_the_fields_given_elsewhere():
    kwargs, _ = settings_from_infotext("a\nSteps: many, Sampler: Nope, Schedule type: Karras, Size: 64x48, Seed: 1",
                                       skip={"steps", "sampler", "width", "prompt"})
    assert kwargs == {"negative_prompt": "", "schedule_type": "karras", "height": 48, "seed": 1, "randn_source": "GPU"}


@pytest.mark.parametrize("params, key", [("Steps: many", "Steps"), ("Size: 12", "Size"), ("CFG scale: nan", "CFG scale"),
                                         ("Sampler: Heun++", "Sampler"), ("Seed: 4.5", "Seed"),
                                         ("Hires upscaler: ../models/x.pth, Hires upscale: 2", "Hires upscaler")])
def test_a_bad_value_names_its_key(params, key):
    with pytest.raises(InfotextError, match=f"'{key}: "):
        settings_from_infotext(f"a cat\nSeed: 1, Size: 64x64, Steps: 2, {params}")


def test_model_mismatch_is_one_line():
    assert model_mismatch(A1111, "v1-5-pruned-emaonly", None) is None
    assert model_mismatch(A1111, "V1-5-pruned-emaonly.safetensors", None) is None
    got = model_mismatch(A1111 + ", VAE: vae-ft-mse.safetensors", "random:tiny", None)
    assert got == ("the infotext names model 'v1-5-pruned-emaonly', this run loads 'random:tiny'; and VAE "
                   "'vae-ft-mse.safetensors', this run uses the model's own: the image may differ")
    assert model_mismatch("a cat\nSteps: 2, Seed: 1, Size: 8x8", "random:tiny", "x.safetensors") is None


def test_given_options_count_even_at_their_default(tmp_path):
    src = tmp_path / "p.txt"
    src.write_text("a cat\nSteps: 30, Sampler: Euler, CFG scale: 3, Seed: 5, Size: 64x64")
    argv = ["--infotext", str(src), "--steps", "20", "--cfg-scale", "7.5", "--height", "32"]  # 20, 7.5: defaults
    assert given_options(argv) >= {"steps", "guidance_scale", "height", "infotext"}
    assert "prompt" not in given_options(argv) and "prompt" in given_options(["", *argv])
    args = build_parser().parse_args(argv)
    apply_infotext(args, given_options(argv))
    assert (args.prompt, args.steps, args.guidance_scale, args.width, args.height, args.seed, args.sampler) == \
        ("a cat", 20, 7.5, 64, 32, 5, "euler")
    args = build_parser().parse_args(["", *argv])  # a prompt given, even empty, replaces the infotext's
    apply_infotext(args, given_options(["", *argv]))
    assert args.prompt == ""


# ---- reading it -------------------------------------------------------------------------------------------


def test_read_from_png_jpeg_webp_txt_and_stdin(tmp_path, monkeypatch):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 2, Seed: 1, Size: 8x8")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png", pnginfo=info)
    assert read_infotext(str(tmp_path / "a.png")) == "a cat\nSteps: 2, Seed: 1, Size: 8x8"
    exif = Image.Exif()  # A1111's JPEG / WEBP: EXIF UserComment, UTF-16 big-endian
    exif[0x8769] = {0x9286: b"UNICODE\0" + "a dög\nSteps: 4, Seed: 9, Size: 8x16".encode("utf-16-be")}
    for fmt in ("jpg", "webp"):
        Image.new("RGB", (8, 16)).save(tmp_path / f"a.{fmt}", exif=exif)
        assert read_infotext(str(tmp_path / f"a.{fmt}")) == "a dög\nSteps: 4, Seed: 9, Size: 8x16"
    (tmp_path / "a.txt").write_bytes("\ufeffa cat\nSteps: 2".encode())
    assert read_infotext(str(tmp_path / "a.txt")) == "a cat\nSteps: 2"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a cow\nSteps: 3, Seed: 2, Size: 8x8\n")))
    assert read_infotext("-") == "a cow\nSteps: 3, Seed: 2, Size: 8x8\n"


# ---- the command line -------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["--sampler", "DPM++ 2M Karras", "--cfg-scale", "5.5", "--seed", "77", "--clip-skip", "2", "--subseed", "5",
     "--subseed-strength", "0.3", "--hires-scale", "1.5", "--hires-steps", "2", "--hires-strength", "0.6",
     "--negative-prompt", "blurry, dark"],
    ["--sampler", "Euler a", "--cfg-scale", "3", "--seed", "4", "--eta-noise-seed-delta", "31337"],
    ["--sampler", "DPM++ 2M", "--schedule-type", "exponential", "--cfg-scale", "3", "--seed", "9", "--clip-skip", "2",
     "--hires-width", "80", "--hires-sampler", "euler", "--hires-upscaler", "Lanczos", "--seed-resize-from-w", "48",
     "--seed-resize-from-h", "56"],
    ["--sampler", "DPM++ SDE Karras", "--cfg-scale", "3", "--seed", "8", "--hires-scale", "1.25",
     "--hires-prompt", "a fox, sharp: detailed", "--hires-negative-prompt", "blurry", "--s-min-uncond", "4.5",
     "--s-min-uncond-all", "--skip-early-cond", "0.2"],
])
def test_the_image_made_again_from_its_png(tmp_path, capsys, args):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["a fox in the snow", *TINY, "--width", "64", "--height", "64", "--steps", "3", *args,
                 "--out", str(a)]) == 0
    capsys.readouterr()
    assert main(["--infotext", str(a), *TINY, "--out", str(b)]) == 0
    assert "warning" not in capsys.readouterr().err
    (text_a, pixels_a), (text_b, pixels_b) = _text(a), _text(b)
    assert text_a == text_b
    assert np.array_equal(pixels_a, pixels_b)


def test_a1111_text_with_overrides_and_warnings(tmp_path, capsys):
    src = tmp_path / "a1111.txt"
    src.write_text(A1111.replace("<lora:detail:0.6>, ", "") + ", Face restoration: CodeFormer, Emphasis: No norm")
    out = tmp_path / "o.png"
    assert main(["a dog", "--infotext", str(src), *TINY, "--width", "64", "--height", "64", "--steps", "2",
                 "--sampler", "Euler", "--hires-scale", "1.25", "--hires-steps", "1", "--out", str(out)]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert err == ["warning: --infotext: infotext keys fastsd doesn't use, ignored: Face restoration, Emphasis",
                   "warning: --infotext: the infotext names model 'v1-5-pruned-emaonly', this run loads "
                   "'random:tiny': the image may differ"]
    prompt, params = _text(out)[0].split("\n", 1)
    assert prompt == "a dog"  # the command line's prompt
    assert params.splitlines()[0] == "Negative prompt: blurry, lowres"
    for part in ("Steps: 2, Sampler: Euler, Schedule type: Karras, CFG scale: 7.0, Seed: 42, Size: 64x64",
                 "Denoising strength: 0.45, Clip skip: 2, Hires upscale: 1.25, Hires steps: 1, "
                 "Hires upscaler: Latent (bicubic)"):  # (no "RNG": the infotext's GPU noise, A1111's default)
        assert part in params, params


def test_a_hires_infotext_with_an_init_image_is_img2img(tmp_path, capsys):
    """A1111's img2img paste of a hires txt2img infotext: no hires fix there (it was "the hires fix is for txt2img"
    here), its "Denoising strength" img2img's strength."""
    src, init, out = tmp_path / "a1111.txt", tmp_path / "init.png", tmp_path / "o.png"
    src.write_text(A1111.replace("<lora:detail:0.6>, ", "").replace("Size: 512x768", "Size: 64x64"))
    Image.new("RGB", (64, 64), (90, 120, 30)).save(init)
    assert main(["--infotext", str(src), "--init-image", str(init), *TINY, "--steps", "2", "--out", str(out)]) == 0
    assert "warning: --infotext: its hires fix is not run with --init-image (A1111's img2img has none); its " \
           "denoising strength is img2img's" in capsys.readouterr().err
    params = _text(out)[0]
    assert "Denoising strength: 0.45" in params and "Hires" not in params and "Size: 64x64" in params, params
    with Image.open(out) as im:
        assert im.size == (64, 64)


@pytest.mark.parametrize("make, match", [
    (lambda d: d / "missing.png", "missing.png: no such file"),
    (lambda d: d / "missing.txt", "missing.txt: no such file"),
    (lambda d: d, "is a folder"),
    (lambda d: (Image.new("RGB", (8, 8)).save(d / "plain.png"), d / "plain.png")[1], "holds no infotext"),
    (lambda d: (d / "x.png").write_bytes(b"not an image") and d / "x.png", "not a readable image"),
    (lambda d: (d / "e.txt").write_text(" \n") and d / "e.txt", "empty, no infotext"),
    (lambda d: (d / "u.txt").write_bytes(b"a \xff cat") and d / "u.txt", "not UTF-8 text"),
    (lambda d: (d / "s.txt").write_text("a\nSteps: many, Seed: 1, Size: 64x64") and d / "s.txt",
     "'Steps: many': not an integer (--steps on the command line overrides it)"),
    (lambda d: (d / "z.txt").write_text("a\nSteps: 2, Seed: 1, Size: 12") and d / "z.txt",
     "'Size: 12': not a size WIDTHxHEIGHT (--width / --height on the command line overrides it)"),
    (lambda d: (d / "r.txt").write_text("a\nSteps: 2, Sampler: Heun++, Seed: 1") and d / "r.txt",
     "'Sampler: Heun++': unknown sampler 'Heun++'"),
    (lambda d: (d / "o.txt").write_text("a\nSteps: 2000, Seed: 1, Size: 64x64") and d / "o.txt",
     "steps must be at most 1000"),
])
def test_bad_input_is_one_line_and_nothing_written(tmp_path, capsys, make, match):
    src = make(tmp_path)
    out = tmp_path / "out"
    assert main(["--infotext", str(src), *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert match in err, err
    assert not out.exists()


def test_stdin_and_an_override_of_a_bad_value(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("a cat\nSteps: many, Sampler: Euler, Seed: 3, Size: 64x64"))
    out = tmp_path / "o.png"
    assert main(["--infotext", "-", *TINY, "--steps", "2", "--out", str(out)]) == 0  # the bad Steps never read
    assert "Steps: 2, Sampler: Euler, Schedule type: Automatic, CFG scale: 7.5, Seed: 3, Size: 64x64" in \
        _text(out)[0]
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["--infotext", "-", *TINY, "--out", str(tmp_path / "p.png")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: --infotext -: empty, no infotext"


@pytest.mark.parametrize("keys, want", [
    ("Hires upscale: 1.0", {"hires_scale": 1.0, "enable_hires": True}),  # A1111 1.6+'s same-size second pass
    ("Hires upscale: 1, Hires upscaler: Latent",
     {"hires_scale": 1.0, "hires_upscaler": "Latent", "enable_hires": True}),
    ("Hires steps: 5", {"hires_steps": 5, "enable_hires": True}),  # (no scale or size: the switch)
    ("Hires upscale: 2.0", {"hires_scale": 2.0}),  # (the scale runs it)
    ("Hires upscale: 0.5", {"hires_scale": 0.5}),  # (A1111's API takes a downscale)
    ("Hires resize: 1004x0", {"hires_width": 1004, "hires_height": 0, "hires_scale": 1.0}),  # (any size, as A1111)
    ("Hires sampler: DPM++ 2M, Hires schedule type: Karras, Hires upscale: 2",  # A1111 1.9+'s split form
     {"hires_scale": 2.0, "hires_sampler": "dpmpp_2m_karras"}),
    ("Hires sampler: DPM++ 2M Karras, Hires upscale: 2", {"hires_scale": 2.0, "hires_sampler": "dpmpp_2m_karras"}),
    ("Hires sampler: DPM2 a, Hires schedule type: Automatic, Hires upscale: 2",  # (A1111's Karras, its discard)
     {"hires_scale": 2.0, "hires_sampler": "dpm2_a", "hires_schedule_type": "karras"}),
])
def test_hires_keys_read_as_a1111s(keys, want):
    kwargs, warnings = settings_from_infotext(f"a\nSteps: 4, Sampler: Euler, Seed: 1, Size: 64x128, Denoising "
                                              f"strength: 0.5, {keys}")
    got = {k: v for k, v in kwargs.items() if k.startswith("hires_") or k == "enable_hires"}
    assert got == {**want, "hires_strength": 0.5} and warnings == []
    GenerationSettings(**kwargs).validate()


def test_settings_line_read_as_a1111s_pattern_in_linear_time(monkeypatch):
    """fastsd.image._params gives A1111's re_param findall on any line (random lines of the characters that matter),
    and reads a line of long runs with a number of pattern matches linear in its length (A1111's findall tries
    every character of a run of key characters: 30 s for 40,000 of them)."""
    import random
    import re

    import fastsd.image as fi

    a1111 = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
    rnd = random.Random(5)
    alphabet = ["a", "b", " ", "-", "/", ":", ",", '"', "\\", "\t", "1", "é"]
    for _ in range(20000):
        line = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 24)))
        assert fi._params(line) == a1111.findall(line), line
    assert fi._params(A1111.split("\n")[-1]) == a1111.findall(A1111.split("\n")[-1])
    calls = []

    class Counting:
        def match(self, line, i):
            calls.append(i)
            return pattern.match(line, i)

    pattern = fi._PARAM_RE
    monkeypatch.setattr(fi, "_PARAM_RE", Counting())
    for line in ("x" * 40000, "- " * 20000 + ":", " -a:" * 10000, "Steps: 3, " + "x y" * 13000):
        calls.clear()
        fi._params(line)
        assert len(calls) <= len(line) // 2 + 2, (line[:12], len(calls))
