"""Command line: python -m fastsd.generate "a photo of a cat" --model PATH [options]
          python -m fastsd.generate --infotext 00012-42.png --model PATH [options]   (A1111's "Send to txt2img")

Writes PNGs whose "parameters" text chunk is A1111's infotext, so A1111's "PNG Info" reads them back:
into a folder with A1111's numbered names (`00012-SEED.png`, never overwriting), or to one .png path.
User mistakes end with one `error:` line and exit status 2, checked before any model work where they can
be; nothing half-written and no empty folder is left behind.
"""
from __future__ import annotations

import argparse
import os
import sys
import typing
import warnings

from fastsd.cli import (ArgumentParser, HelpFormatter, add_backend_arg, fail, int_in, one_line_warnings, positive_int,
                        run_summary, set_threads, thread_count)
from fastsd.settings import FIELDS, GenerationSettings

MODEL_ENV = "FASTSD_MODEL"
EMBEDDINGS_ENV = "FASTSD_EMBEDDINGS_DIR"
IMAGE_EXTS = (".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# --masked-content: A1111's names; the latent ones are Pipeline.generate's masked_content (after a pixel fill)
MASKED_CONTENT = {"fill": "original", "original": "original", "latent-noise": "latent noise",
                  "latent-nothing": "latent nothing"}
A1111_INPAINT = ("mask_blur", "inpaint_area", "inpaint_padding", "masked_content")


def _settings_options(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One option per GenerationSettings field (but `skip`): flag, type, default and help from the field."""
    hints = typing.get_type_hints(GenerationSettings)
    for name, f in FIELDS.items():
        if name in skip:
            continue
        meta = f.metadata
        flag = meta.get("flag") or "--" + name.replace("_", "-")
        if flag == "prompt":  # (optional with --infotext, which has one: _Parser asks for it otherwise)
            p.add_argument("prompt", nargs="?", default=None, help=meta["help"])
        elif hints[name] is bool:  # a switch, off by default
            p.add_argument(flag, dest=name, action="store_true", default=f.default, help=meta["help"])
        else:
            typ = next(t for t in (int, float, str) if t in typing.get_args(hints[name]) or hints[name] is t)
            p.add_argument(flag, dest=name, type=typ, default=f.default, help=meta["help"])


class _Parser(ArgumentParser):
    """The prompt is required, unless --infotext gives one."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extra = super().parse_known_args(args, namespace)
        if getattr(ns, "prompt", "") is None and getattr(ns, "infotext", None) is None:
            self.error("the following arguments are required: prompt")
        return ns, extra


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m fastsd.generate", formatter_class=HelpFormatter,
                description="Stable Diffusion 1.x text-to-image, image-to-image and inpainting.")
    _settings_options(p)
    p.add_argument("--infotext", metavar="SOURCE", default=None, help="A1111's 'PNG Info -> Send to txt2img': "
                   "the generation options (prompt, negative prompt, steps, sampler, schedule type, CFG scale, seed, "
                   "size, clip skip, variation seed, seed resize, hires fix) default to the infotext of SOURCE: a "
                   "PNG/JPEG/WEBP written by fastsd or A1111, a .txt file holding the text, or - for stdin; options "
                   "and a prompt given here win")
    p.add_argument("--model", help=f"LDM .safetensors/.ckpt, diffusers folder, repo id in the local HF cache, or "
                   f"random:sd15 / random:tiny (random weights); default ${MODEL_ENV}, else the only SD1.x model "
                   "in the local HF cache")
    p.add_argument("--vae", help="replace the model's VAE: an LDM VAE .safetensors/.ckpt (e.g. "
                   "vae-ft-mse-840000-ema-pruned), a diffusers VAE folder, or taesd:PATH (a TAESD decoder file, its "
                   "encoder found beside it, or a diffusers AutoencoderTiny folder); a name that is no path: the file "
                   "of that name or stem in --vae-dir or beside the model (A1111's sd_vae); 'none': the checkpoint's "
                   "own. Default: A1111's \"Automatic\", a VAE file beside the model file (NAME.vae.pt / .vae.ckpt "
                   "/ .vae.safetensors), else the first file of --vae-dir whose name starts with NAME, else the "
                   "checkpoint's own")
    p.add_argument("--vae-dir", default=None, metavar="DIR", help="folder of VAE files (.safetensors / .ckpt / .pt, "
                   "subfolders searched; A1111's models/VAE) that --vae names by file name or stem and the "
                   "\"Automatic\" VAE is looked for in (default $FASTSD_VAE_DIR)")
    p.add_argument("--embeddings-dir", default=None, help="textual-inversion embeddings (.pt/.safetensors/.bin, "
                   f"searched recursively): a prompt word equal to a file's name uses it; default ${EMBEDDINGS_ENV}")
    p.add_argument("--preview", default=None, help="a .png file rewritten (atomically) with a preview of the image "
                   "while it forms: TAESD-decoded with a TAESD --vae, else a latent-to-RGB approximation")
    p.add_argument("--preview-every", type=positive_int, default=1, help="steps between --preview updates")
    p.add_argument("--init-image", help="image-to-image / inpainting source image")
    p.add_argument("--mask", help="inpainting mask, white = repaint; one of another size than the init "
                   "image is resized with it to --width x --height (A1111's)")
    p.add_argument("--mask-blur", type=int_in(0, 64), default=None, help="A1111's inpainting (any of these four "
                   "options turns it on; default: diffusers'): the mask (an RGBA mask's alpha) blurred by this sigma, "
                   "px (4), and the init image laid back over the result outside it")
    p.add_argument("--inpaint-area", choices=["whole", "only-masked"], default=None, help="A1111's 'Inpaint area': "
                   "whole picture, or only the box around the mask, repainted at --width x --height and put back")
    p.add_argument("--inpaint-padding", type=int_in(0, 1 << 16), default=None, help="A1111's 'Only masked padding', "
                   "px (32)")
    p.add_argument("--masked-content", choices=list(MASKED_CONTENT), default=None, help="A1111's 'Masked content' "
                   "(original)")
    p.add_argument("--out", default="outputs", help="output folder (numbered names NNNNN-SEED.png), or a .png path "
                   "for a single image")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out FILE.png (and --preview file)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="default: fp16 on cuda; bf16 on a cpu with native bf16 (AVX512-BF16/AMX), else fp32")
    add_backend_arg(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet and VAE decoder (CUDA: CUDA graphs; "
                   "CPU: Inductor C++ instead of the cpu backend, measured slower there); the first image pays the "
                   "compile time")
    p.add_argument("--threads", type=thread_count, default=None, help="CPU threads (default: the physical cores)")
    p.add_argument("--offload", action="store_true", help="keep only the running model on the GPU")
    p.add_argument("--tiled-vae", action="store_true", help="always decode/encode the VAE in tiles "
                   "(automatic above 1024 px a side)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="merge a LoRA file (.safetensors, or .pt / .ckpt read weights-only; kohya/A1111, LyCORIS, "
                   "diffusers/PEFT formats) with this weight (default 1); repeatable")
    p.add_argument("--lora-dir", default=None, help="where the prompt's <lora:NAME:WEIGHT> tags find NAME.safetensors "
                   "(or .pt, .ckpt; subfolders searched) (default $FASTSD_LORA_DIR)")
    p.add_argument("--upscaler-dir", default=None, metavar="DIR", help="upscaler models (ESRGAN, Real-ESRGAN, "
                   "SwinIR .pth / .safetensors; A1111's models/ESRGAN) that --hires-upscaler names by file name "
                   "(default $FASTSD_UPSCALER_DIR)")
    p.add_argument("--styles-file", default=None, metavar="PATH", help="A1111's prompt styles: a styles.csv "
                   "(name,prompt,negative_prompt) or a folder of such .csv files; default $FASTSD_STYLES")
    p.add_argument("--style", action="append", default=[], metavar="NAME", help="apply this style of --styles-file "
                   "to the prompt and negative prompt, A1111's way (its {prompt} takes the prompt, else it is appended "
                   "after ', '); repeatable, applied in order; the infotext records the styled prompts")
    p.add_argument("--allow-large", action="store_true", help="allow width/height above 4096")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def apply_cli_styles(args: argparse.Namespace, settings: GenerationSettings) -> GenerationSettings:
    """The settings with --style's styles applied to the prompts (the hires ones too, when given, as A1111 styles
    its hr_prompt); ValueError (one line) for a styles file that can't be read or a name it doesn't have. A
    --styles-file given on the command line is read (and checked) even without --style; $FASTSD_STYLES only with one."""
    from fastsd.styles import STYLES_ENV, apply_styles, read_styles, style_path

    path = style_path(args.styles_file)
    if not args.style and args.styles_file is None:
        return settings
    if path is None:
        raise ValueError(f"--style {args.style[0]}: no styles file; give --styles-file PATH (a styles.csv or a "
                         f"folder of them) or set ${STYLES_ENV}")
    what = "--styles-file" if args.styles_file else f"${STYLES_ENV}"
    styles, notes = read_styles(path, what)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    missing = [n for n in args.style if n not in styles]
    if missing:
        have = ", ".join(repr(n) for n in list(styles)[:20]) + (", ..." if len(styles) > 20 else "")
        raise ValueError(f"--style {missing[0]!r}: no such style in {what} {path} (it has: {have or 'none'})")
    prompt, negative, _ = apply_styles(styles, args.style, settings.prompt, settings.negative_prompt)
    hires = {}
    if settings.hires_prompt:
        hires["hires_prompt"] = apply_styles(styles, args.style, settings.hires_prompt, "")[0]
    if settings.hires_negative_prompt:
        hires["hires_negative_prompt"] = apply_styles(styles, args.style, "", settings.hires_negative_prompt)[1]
    return settings.replace(prompt=prompt, negative_prompt=negative, **hires)


def default_model() -> str:
    if os.environ.get(MODEL_ENV):
        return os.environ[MODEL_ENV]
    from fastsd.checkpoint import sd1_models_in_hf_cache

    found = sd1_models_in_hf_cache()
    if len(found) == 1:
        return found[0]
    hint = (f"found {len(found)} in the local Hugging Face cache ({', '.join(found)}): pick one with --model"
            if found else "none found in the local Hugging Face cache")
    raise ValueError(f"no model given: pass --model PATH (an SD1.x .safetensors/.ckpt or diffusers folder), set "
                     f"{MODEL_ENV}, or use --model random:sd15 for random weights; {hint}")


def check_out(out: str, n: int, overwrite: bool) -> tuple[str, str | None]:
    """(folder, file or None) for --out, checked before any work: a .png path (one image; an existing file
    only with --overwrite) or a folder this process can create files in."""
    from fastsd.files import check_writable_folder

    if not out.strip():
        raise ValueError("--out: an empty path; give a .png path or a folder")
    ext = os.path.splitext(out)[1].lower()
    if ext in IMAGE_EXTS:
        raise ValueError(f"--out {out}: fastsd writes PNG (the infotext lives in its text chunk); give a .png path "
                         "or a folder")
    if ext == ".png":
        if n != 1:
            raise ValueError(f"--out {out} names one file but --num-images is {n}; give a folder instead")
        if os.path.isdir(out):
            raise ValueError(f"--out {out}: is a folder")
        if os.path.exists(out) and not overwrite:
            raise ValueError(f"--out {out}: the file exists (--overwrite replaces it)")
        folder = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(folder):
            raise ValueError(f"--out {out}: folder {folder} does not exist")
        check_writable_folder(folder, f"--out {out}")
        return folder, out
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: is a file, not a folder (a single image needs a .png path)")
    check_writable_folder(out, f"--out {out}")
    return out, None


def check_extras(args: argparse.Namespace, out_file: str | None) -> str | None:
    """Checks of --preview and --embeddings-dir before any work; returns the embeddings folder (or None)."""
    if args.preview is not None:
        if not args.preview.lower().endswith(".png"):
            raise ValueError(f"--preview {args.preview}: give a .png path")
        if os.path.isdir(args.preview):
            raise ValueError(f"--preview {args.preview}: is a folder")
        if out_file is not None and os.path.abspath(out_file) == os.path.abspath(args.preview):
            raise ValueError(f"--preview {args.preview}: is the --out file")
        if os.path.exists(args.preview) and not args.overwrite:
            raise ValueError(f"--preview {args.preview}: the file exists (--overwrite replaces it)")
        folder = os.path.dirname(os.path.abspath(args.preview))
        if not os.path.isdir(folder):
            raise ValueError(f"--preview {args.preview}: folder {folder} does not exist")
        from fastsd.files import check_writable_folder

        check_writable_folder(folder, f"--preview {args.preview}")
    elif args.preview_every != 1:
        raise ValueError("--preview-every needs --preview FILE")
    emb = args.embeddings_dir or os.environ.get(EMBEDDINGS_ENV) or None
    if emb is not None and not os.path.isdir(emb):
        what = "--embeddings-dir" if args.embeddings_dir else f"${EMBEDDINGS_ENV}"
        raise ValueError(f"{what} {emb}: " + ("a file; give the folder that holds the embeddings"
                                              if os.path.exists(emb) else "no such folder"))
    return emb


def a1111_inpaint(args: argparse.Namespace, image, mask, size: tuple[int, int]):
    """The image and mask the model gets, and the overlay, as A1111's inpainting (fastsd.masking.prepare); and
    A1111's inpainting keys for the infotext."""
    from fastsd import masking

    blur = 4 if args.mask_blur is None else args.mask_blur
    padding = 32 if args.inpaint_padding is None else args.inpaint_padding
    got = masking.prepare(image.convert("RGB"), masking.blur(masking.binary_mask(mask), blur, blur), size,
                          only_masked=args.inpaint_area == "only-masked", padding=padding,
                          fill_content=args.masked_content not in (None, "original"))
    if got.note:
        warnings.warn(got.note, stacklevel=1)
    fill = ("fill", "original", "latent-noise", "latent-nothing").index(args.masked_content or "original")
    return got, masking.infotext_params(got, blur_x=blur, blur_y=blur, invert=False, padding=padding, fill=fill)


def preview_writer(path: str | None):
    """The on_step callback that rewrites the --preview file (atomically) whenever a preview comes."""
    if path is None:
        return None
    from fastsd.files import atomic_write
    from fastsd.image import png_writer

    def on_step(step: int, total: int, preview) -> None:
        if preview is not None:
            atomic_write(path, png_writer(preview))

    return on_step


def save(images, folder: str, file: str | None, overwrite: bool, seeds: list[int]) -> list[str]:
    from fastsd.files import write_numbered
    from fastsd.image import png_writer, save_png

    if file is not None:
        return [save_png(images[0], file, images[0].info["parameters"], overwrite=overwrite)]
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {folder}: can't create the folder ({e.strerror})") from None
    return [write_numbered(folder, f"{seed}.png", png_writer(im, im.info["parameters"]))
            for im, seed in zip(images, seeds)]


def hires_upscaler(args: argparse.Namespace) -> str:
    """--hires-upscaler as the pipeline takes it (`find_hires_upscaler` in --upscaler-dir)."""
    return find_hires_upscaler(args.hires_upscaler, args.upscaler_dir)


def find_hires_upscaler(name: str | None, folder: str | None) -> str | None:
    """A hires upscaler as the pipeline takes it: A1111's built-in names and a model file's path as they are, a
    model's name (its file stem, or an A1111 name such as "R-ESRGAN 4x+") as its file in `folder` (none given:
    $FASTSD_UPSCALER_DIR); None (unset: Latent) as it is. ValueError, one line."""
    from fastsd import hires

    if name is None:
        return None
    from fastsd.upscalers import UPSCALER_DIR_ENV, upscaler_path

    folder = folder or os.environ.get(UPSCALER_DIR_ENV)
    try:
        return hires.resolve_upscaler(name)
    except ValueError:
        if not folder or os.sep in name or "/" in name or name.lower().endswith(hires.MODEL_EXTS):
            raise
    return upscaler_path(name, folder)


def lora_files(args: argparse.Namespace, prompt: str) -> list[tuple]:
    """[(file, weight)] of --lora FILE[:WEIGHT], and [(file, weight, NAME)] of the prompt's <lora:NAME:WEIGHT> tags
    (found in --lora-dir by file stem or A1111 alias: the name is the tag's)."""
    from fastsd.lora import LORA_DIR_ENV, lora_path, parse_lora_arg, parse_prompt

    found = [parse_lora_arg(a) for a in args.lora]
    for path, _ in found:
        if not os.path.isfile(path):
            raise ValueError(f"--lora {path}: " + ("a folder, not a LoRA file (a folder of LoRAs is --lora-dir)"
                                                   if os.path.isdir(path) else "no such file"))
    folder = args.lora_dir or os.environ.get(LORA_DIR_ENV)
    return found + [(lora_path(name, folder), weight, name) for name, weight in parse_prompt(prompt)[1]]


def given_options(argv: list[str] | None) -> set[str]:
    """The destinations of the options (and the prompt) given on the command line `argv`, default or not: the
    arguments parsed again with every default suppressed."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return {k for k, v in vars(p.parse_args(argv)).items() if v != argparse.SUPPRESS}


def apply_infotext(args: argparse.Namespace, given: set[str]) -> None:
    """--infotext: the infotext's settings in `args` where the command line gave none (`given`); its warnings
    printed (one line each). ValueError (one line) for a source that can't be read or a value that can't."""
    from fastsd.infotext_settings import InfotextError, read_infotext, settings_from_infotext

    text = read_infotext(args.infotext)
    try:
        kwargs, notes = settings_from_infotext(text, skip=given)
    except InfotextError as e:
        flags = [FIELDS[f].metadata.get("flag") or "--" + f.replace("_", "-") for f in e.fields]
        hint = f" ({' / '.join(flags)} on the command line overrides it)" if flags else ""
        raise ValueError(f"--infotext {args.infotext}: {e}{hint}") from None
    if args.init_image is not None and (hires := [k for k in kwargs if k.startswith("hires_") or k == "enable_hires"]):
        # A1111's img2img paste: no hires fix there; its "Denoising strength" is img2img's strength
        if "hires_strength" in kwargs and "strength" not in given:
            kwargs["strength"] = kwargs["hires_strength"]
        for k in hires:
            del kwargs[k]
        notes.append("its hires fix is not run with --init-image (A1111's img2img has none); its denoising strength "
                     "is img2img's")
    for name, value in kwargs.items():
        setattr(args, name, value)
    for note in notes:
        print(f"warning: --infotext: {note}", file=sys.stderr)
    args.infotext_text = text


def infotext_vae(text: str | None, model: str, folder: str | None = None) -> str | None:
    """The VAE file beside the model file or in the VAE folder `folder` (as A1111 lists them: `listed_vaes`) that the
    --infotext's "VAE" key names, said in one line; None (A1111's "Automatic") when it names none or none is there
    (model_mismatch then says so)."""
    from fastsd.image import parse_infotext
    from fastsd.vae_files import listed_vaes, vae_by_name

    name = parse_infotext(text)[2].get("VAE") if text is not None else None
    if not (isinstance(name, str) and name.strip()):
        return None
    beside = os.path.dirname(os.path.abspath(model)) if os.path.isfile(model) else None
    path = vae_by_name(name, listed_vaes(folder, [beside] if beside else []))
    if path is not None:
        where = "beside the model" if os.path.dirname(os.path.abspath(path)) == beside else "in --vae-dir"
        print(f"fastsd: VAE {os.path.basename(path)} {where}, as the --infotext names it; --vae none uses "
              "the checkpoint's own", file=sys.stderr)
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    one_line_warnings()
    try:
        if args.infotext is not None:
            try:
                apply_infotext(args, given_options(argv))
            except ValueError as e:
                return fail(str(e))
        return run(args)
    except KeyboardInterrupt:
        print("interrupted; nothing was written for unfinished images", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    try:
        args.hires_upscaler = hires_upscaler(args)
    except ValueError as e:
        return fail(str(e))
    settings = GenerationSettings(**{name: getattr(args, name) for name in FIELDS})
    try:
        settings = apply_cli_styles(args, settings)
        settings.validate(has_image=args.init_image is not None, has_mask=args.mask is not None,
                          allow_large=args.allow_large)
        a1111 = [name for name in A1111_INPAINT if getattr(args, name) is not None]
        if a1111 and args.mask is None:
            raise ValueError(f"--{a1111[0].replace('_', '-')}: A1111's inpainting options need --mask (and --init-image)")
        folder, file = check_out(args.out, settings.num_images, args.overwrite)
        embeddings_dir = check_extras(args, file)
        if args.compile and args.backend == "openvino":
            raise ValueError("--compile: backend openvino compiles its own models; use --compile with torch, cpu "
                             "or triton")
        model = args.model or default_model()
    except (ValueError, TypeError) as e:
        return fail(str(e))
    from fastsd import BackendError, CheckpointError, load_pipeline  # torch is imported from here on
    from fastsd.image import check_mask, load_image
    from fastsd.masking import apply_overlay
    from fastsd.vae_files import AutomaticVAE, cli_vae, vae_folder

    try:
        vae_dir = vae_folder(args.vae_dir)
        vae = args.vae if args.vae is not None else infotext_vae(getattr(args, "infotext_text", None), model, vae_dir)
        vae, vae_note = cli_vae(vae, model, vae_dir)
        image = load_image(args.init_image, "--init-image") if args.init_image else None
        mask = load_image(args.mask, "--mask") if args.mask else None
        check_mask(image, mask)
        loras = lora_files(args, settings.prompt)
        threads = set_threads(args.threads)
        pipe = load_pipeline(model, device=args.device, dtype=args.dtype, backend=args.backend, vae=vae,
                             compile=args.compile)
        if vae_note is not None:  # (a file beside the model: load_pipeline said so)
            warnings.warn(AutomaticVAE(vae_note), stacklevel=1)
        pipe.offload = args.offload
        if getattr(args, "infotext_text", None) is not None:
            from fastsd.infotext_settings import model_mismatch

            if (note := model_mismatch(args.infotext_text, pipe.name, pipe.vae_name)) is not None:
                print(f"warning: --infotext: {note}", file=sys.stderr)
        pipe.load_loras(loras, keep_originals=False)  # (a run of the CLI never unloads: no copy of the weights)
        pipe.check_can_encode(image, settings)
        pipe.check_hires_upscaler(settings)
        if embeddings_dir is not None:
            pipe.load_embeddings(embeddings_dir)
        s = pipe.resolve(settings, image)
        if pipe.embeddings is not None:  # read the embeddings the prompts name now: a bad one fails before any work
            from fastsd.lora import strip_tags  # (a word only inside a <lora:...> tag names no embedding)

            hires = s.hires_prompts() if s.hires else ()
            pipe.embeddings.used([strip_tags(s.prompt), s.negative_prompt, *map(strip_tags, hires)])
        vae = f", vae {pipe.vae_name}" if pipe.vae_name else ""
        size = f"{s.width}x{s.height}" + (" -> {}x{} hires".format(*s.hires_target().size) if s.hires else "")
        print(run_summary(pipe, threads, f"{vae}, {size}, {s.steps} steps {s.sampler}, seed {s.seed}"),
              file=sys.stderr)
        inpaint, a1111_keys = a1111_inpaint(args, image, mask, (s.width, s.height)) if a1111 else (None, None)
        if inpaint is not None:  # (A1111's way: its latent mask, its infotext keys)
            image, mask = inpaint.image, inpaint.mask
        images = pipe.generate(**s.kwargs(), image=image, mask=mask, progress=not args.no_progress,
                               tiled_vae=True if args.tiled_vae else None, on_step=preview_writer(args.preview),
                               preview_every=args.preview_every, allow_large=args.allow_large,
                               masked_content=MASKED_CONTENT[args.masked_content or "original"],
                               latent_mask="bicubic" if inpaint is not None else "nearest", infotext_extra=a1111_keys)
        if inpaint is not None and inpaint.overlay is not None:
            images = [apply_overlay(im, inpaint.overlay, inpaint.paste_to) for im in images]
        for path in save(images, folder, file, args.overwrite, [s.image_seed(i) for i in range(s.num_images)]):
            print(path)
    except FileExistsError as e:
        return fail(f"--out {e.filename}: the file appeared while generating; not replaced (--overwrite replaces it)")
    except (ValueError, TypeError, CheckpointError, BackendError) as e:
        return fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
