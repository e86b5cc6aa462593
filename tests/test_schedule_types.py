"""A1111's schedule types (fastsd/schedule_types.py): diffusers' `use_*_sigmas` Euler schedules as the oracle where
they exist, transcriptions of A1111's modules/sd_schedulers.py (and k-diffusion's get_sigmas_*) for the others, then
the type through settings, pipeline, infotext, CLI, server and batch jobs."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastsd.denoisers import EpsDenoiser
from fastsd.samplers import A1111_NAMES, get_sampler
from fastsd.schedule_types import (SCHEDULE_TYPES, check_sampler, resolve_schedule_type, schedule_label, sigma_table,
                                   typed_schedule)
from fastsd.schedules import alphas_cumprod
from fastsd.settings import GenerationSettings

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            steps_offset=1, prediction_type="epsilon")


# ---- the oracle: A1111 transcribed (torch float32, as A1111 runs it on its model wrapper) -----------------------

class A1111Model:
    """k-diffusion's DiscreteSchedule over the SD1.x table: sigmas, sigma_to_t (unquantized), t_to_sigma."""

    def __init__(self):
        ac = alphas_cumprod()
        self.sigmas = ((1 - ac) / ac) ** 0.5
        self.log_sigmas = self.sigmas.log()

    def sigma_to_t(self, sigma):
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        low, high = self.log_sigmas[low_idx], self.log_sigmas[low_idx + 1]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return ((1 - w) * low_idx + w * (low_idx + 1)).view(sigma.shape)

    def t_to_sigma(self, t):
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]).exp()

    def get_sigmas(self, n):
        t = torch.linspace(len(self.sigmas) - 1, 0, n)
        return torch.cat([self.t_to_sigma(t), torch.zeros(1)])


def a1111_sigmas(name, n):
    m = A1111Model()
    lo, hi = m.sigmas[0].item(), m.sigmas[-1].item()
    zero = torch.zeros(1)
    if name in ("uniform", "normal"):  # normal_scheduler(sgm=False): the same timesteps as get_sigmas
        return m.get_sigmas(n)
    if name == "karras":
        ramp = torch.linspace(0, 1, n)
        return torch.cat([(hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7, zero])
    if name == "exponential":
        return torch.cat([torch.linspace(math.log(hi), math.log(lo), n).exp(), zero])
    if name == "polyexponential":
        ramp = torch.linspace(1, 0, n) ** 1.0
        return torch.cat([torch.exp(ramp * (math.log(hi) - math.log(lo)) + math.log(lo)), zero])
    if name == "sgm_uniform":
        start, end = m.sigma_to_t(torch.tensor(hi)), m.sigma_to_t(torch.tensor(lo))
        return torch.tensor([m.t_to_sigma(t).item() for t in torch.linspace(start, end, n + 1)[:-1]] + [0.0])
    if name == "kl_optimal":
        a_min, a_max = torch.arctan(torch.tensor(lo)), torch.arctan(torch.tensor(hi))
        i = torch.arange(n + 1)
        return torch.tan(i / n * a_min + (1.0 - i / n) * a_max)
    if name == "align_your_steps":
        sig = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
        if n != len(sig):
            xs, ys = np.linspace(0, 1, len(sig)), np.log(sig[::-1])
            sig = np.append(np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].copy(), [0.0])
        else:
            sig = sig + [0.0]
        return torch.FloatTensor(sig)
    if name == "simple":
        ss = len(m.sigmas) / n
        return torch.FloatTensor([float(m.sigmas[-(1 + int(x * ss))]) for x in range(n)] + [0.0])
    if name == "ddim":
        sigs, ss, x = [], max(len(m.sigmas) // n, 1), 1
        while x < len(m.sigmas):
            sigs += [float(m.sigmas[x])]
            x += ss
        return torch.FloatTensor(sigs[::-1] + [0.0])
    if name == "beta":
        from scipy import stats
        ts = [stats.beta.ppf(x, 0.6, 0.6) for x in 1 - np.linspace(0, 1, n)]
        return torch.FloatTensor([lo + x * (hi - lo) for x in ts] + [0.0])
    raise AssertionError(name)


@pytest.mark.parametrize("name", list(SCHEDULE_TYPES))
@pytest.mark.parametrize("n", [1, 2, 4, 7, 10, 11, 20, 30, 50])
def test_sigmas_follow_a1111(name, n):
    """Each type's noise levels are A1111's (float32 rounding apart), the UNet timesteps its unquantized
    sigma_to_t of them, the start noise at the first sigma."""
    if name == "beta":
        pytest.importorskip("scipy")
    got = typed_schedule(name, n)
    want = a1111_sigmas(name, n).double()
    assert got.sigmas.shape == want.shape
    torch.testing.assert_close(got.sigmas, want, rtol=2e-6, atol=1e-7)
    t = A1111Model().sigma_to_t(got.sigmas[:-1].float()).double()
    torch.testing.assert_close(got.timesteps, t, rtol=0, atol=2e-3)  # (float32 arithmetic in A1111's)
    assert got.init_noise_sigma == float(got.sigmas[0])
    assert len(got) == (n if name != "ddim" else math.ceil(999 / max(1000 // n, 1)))


@pytest.mark.parametrize("name, flag", [("exponential", "use_exponential_sigmas"), ("beta", "use_beta_sigmas"),
                                        ("karras", "use_karras_sigmas")])
@pytest.mark.parametrize("n", [2, 3, 4, 8, 20, 25, 50])
def test_matches_diffusers_euler_schedules(name, flag, n):
    """Where diffusers has the type (EulerDiscreteScheduler use_*_sigmas=True), sigmas and timesteps are its, bit
    for bit (n=1 differs on purpose: diffusers' one step starts at sigma_min, A1111's at sigma_max)."""
    diffusers = pytest.importorskip("diffusers")
    if name == "beta":
        pytest.importorskip("scipy")
    d = diffusers.EulerDiscreteScheduler.from_config(SD15, **{flag: True})
    d.set_timesteps(n)
    s = typed_schedule(name, n)
    assert torch.equal(s.sigmas, d.sigmas.double()) and torch.equal(s.timesteps, d.timesteps.double())
    assert s.init_noise_sigma == pytest.approx(float(d.init_noise_sigma), rel=1e-7)


def _fake_eps(x, t, context=None):
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1).view(-1, 1, 1, 1)
    return torch.tanh(0.5 * x + t / 1000.0) + 0.1 * x.roll(1, dims=1)


def test_euler_loop_with_exponential_matches_diffusers():
    """The sampling loop over the type's schedule is diffusers' Euler with use_exponential_sigmas=True."""
    diffusers = pytest.importorskip("diffusers")
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    d = diffusers.EulerDiscreteScheduler.from_config(SD15, use_exponential_sigmas=True)
    d.set_timesteps(12)
    lat, ref_ts = noise * d.init_noise_sigma, []
    for t in d.timesteps:
        ref_ts.append(float(t))
        lat = d.step(_fake_eps(d.scale_model_input(lat, t), t), t, lat).prev_sample
    sched, ts = typed_schedule("exponential", 12), []

    def eps(x, t, context=None):
        ts.append(float(t.reshape(-1)[0]))
        return _fake_eps(x, t)

    den = EpsDenoiser(eps, alphas_cumprod(), schedule=sched)
    x = get_sampler("euler")(den, noise * sched.init_noise_sigma, sched.sigmas, disable=True) * sched.out_scale
    assert ts == ref_ts  # the UNet sees diffusers' fractional timesteps
    # ~1.3e-7 (diffusers' steps run in float32 sigmas on float64 latents), as tests/test_samplers.py's parity bound
    assert ((x - lat).abs().max() / lat.abs().max()).item() < 3e-6


def test_names_labels_and_samplers():
    assert [resolve_schedule_type(n) for n in ("Align Your Steps", "SGMUniform", "sgm uniform", "KL Optimal", None,
                                                "", "Automatic")] == \
        ["align_your_steps", "sgm_uniform", "sgm_uniform", "kl_optimal", "automatic", "automatic", "automatic"]
    assert schedule_label("exponential") == "Exponential" and schedule_label("automatic") is None
    with pytest.raises(ValueError, match="unknown schedule type 'Karras Exponential'; valid: Automatic, Uniform"):
        resolve_schedule_type("Karras Exponential")
    with pytest.raises(ValueError, match="does not apply to ddim"):
        check_sampler("karras", "ddim")
    check_sampler("automatic", "ddim")
    check_sampler("sgm_uniform", "lcm")
    with pytest.raises(ValueError, match="does not apply to ddpm"):
        GenerationSettings(sampler="DDPM", schedule_type="Beta").validate()
    with pytest.raises(TypeError, match="schedule_type must be a string"):
        GenerationSettings(schedule_type=3).validate()
    assert len(sigma_table()) == 1000


@pytest.fixture(scope="module")
def pipe():
    from fastsd import load_pipeline

    return load_pipeline("random:tiny", device="cpu", dtype=torch.float32)


def test_pipeline_runs_the_type_and_writes_a1111s_infotext(pipe):
    base = dict(prompt="a red cube", steps=4, guidance_scale=1.0, sampler="euler", seed=5, width=64, height=64,
                progress=False)
    plain = pipe.generate(**base)[0]
    ays = pipe.generate(**base, schedule_type="Align Your Steps")[0]
    again = pipe.generate(**base, schedule_type="align_your_steps")[0]
    assert np.array_equal(np.asarray(ays), np.asarray(again)) and not np.array_equal(np.asarray(ays), np.asarray(plain))
    assert "Sampler: Euler, Schedule type: Align Your Steps, CFG scale" in ays.info["parameters"]
    assert "Sampler: Euler, Schedule type: Automatic, CFG scale" in plain.info["parameters"]  # (A1111 1.10's)
    # the schedule the pipeline walks is the type's (Pipeline.schedule, also the hires pass's)
    assert torch.equal(pipe.schedule("euler", 4, "align_your_steps").sigmas, typed_schedule("align_your_steps", 4).sigmas)
    assert torch.equal(pipe.schedule("euler", 4).sigmas, get_sampler("euler").schedule(4).sigmas)
    # Karras for a sampler with a Karras twin is the twin's (diffusers') schedule: DPM++ 2M's rounded timesteps
    twin, typed = pipe.schedule("dpmpp_2m", 4, "karras"), typed_schedule("karras", 4)
    assert torch.equal(twin.timesteps, get_sampler("dpmpp_2m_karras").schedule(4).timesteps)
    assert torch.equal(twin.timesteps, twin.timesteps.round()) and not torch.equal(twin.timesteps, typed.timesteps)
    assert torch.equal(pipe.schedule("euler_a", 4, "karras").timesteps, typed.timesteps)  # (no twin: the type's)
    # A1111's discard_next_to_last_sigma (DPM2, DPM2 a, DPM++ 3M SDE): the levels of steps + 1, the next-to-last gone
    for sampler in ("dpm2", "DPM2 a", "dpmpp_3m_sde"):
        got = pipe.schedule(sampler, 5, "exponential")
        want = a1111_sigmas("exponential", 6).double()
        assert len(got) == 5
        torch.testing.assert_close(got.sigmas, torch.cat([want[:-2], want[-1:]]), rtol=2e-6, atol=1e-7)
    assert len(pipe.schedule("dpmpp_2m", 5, "exponential")) == 5
    with pytest.raises(ValueError, match="does not apply to ddim"):
        pipe.generate(**{**base, "sampler": "ddim"}, schedule_type="karras")


def test_cli_option_and_its_bad_values(tmp_path):
    out = tmp_path / "a.png"
    cmd = [sys.executable, "-m", "fastsd.generate", "a cat", "--model", "random:tiny", "--steps", "2", "--width", "64",
           "--height", "64", "--seed", "1", "--sampler", "dpmpp_2m", "--out", str(out)]
    r = subprocess.run(cmd + ["--schedule-type", "sgm_uniform"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from PIL import Image
    assert "Sampler: DPM++ 2M, Schedule type: SGM Uniform" in Image.open(out).info["parameters"]
    for bad, msg in [(["--schedule-type", "nope"], "unknown schedule type 'nope'"),
                     (["--sampler", "DPM++ 2M SDE Exponential"], "unknown sampler 'DPM++ 2M SDE Exponential': give the "
                      "sampler 'DPM++ 2M SDE' with the schedule type 'exponential' (--schedule-type)"),
                     (["--schedule-type", "karras", "--sampler", "ddim"], "does not apply to ddim")]:
        r = subprocess.run(cmd[:-1] + [str(tmp_path / "b.png")] + bad, capture_output=True, text=True)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "b.png").exists()


def test_batch_job_field(tmp_path):
    from fastsd.batch.jobs import BadJob, Defaults, read_job_file

    path = tmp_path / "jobs.jsonl"
    path.write_text('{"prompt": "a", "scheduler": "Exponential", "sampler": "Euler a"}\n{"prompt": "b"}\n'
                    '{"prompt": "c", "scheduler": "Karras", "sampler": "DDIM"}\n{"prompt": "d", "scheduler": "x"}\n'
                    '{"prompt": "e", "scheduler": 3}\n')
    a, b, c, d, e = read_job_file(path, Defaults(steps=2, width=64, height=64))
    assert isinstance(e, BadJob) and e.error == "scheduler must be a schedule type's name, got 3"
    assert a.settings.schedule_type == "exponential" and a.manifest_settings()["scheduler"] == "exponential"
    assert b.settings.schedule_type == "automatic" and "scheduler" not in b.manifest_settings()
    assert isinstance(c, BadJob) and "does not apply to ddim" in c.error
    assert isinstance(d, BadJob) and d.error.startswith("unknown schedule type 'x'")


def test_a1111_api_and_paste_rules():
    """fastsd.a1111.scheduled: A1111's API (a scheduler given wins) and its infotext paste (a joint name wins,
    none given = the sampler's own); old joint names with any schedule split; the hires pass's schedule compared
    with what the first pass's type gives it."""
    from fastsd.a1111 import hires_scheduled, scheduled
    from fastsd.schedule_types import split_joint

    assert split_joint("DPM++ 2M SDE Exponential") == ("DPM++ 2M SDE", "Exponential")
    assert split_joint("Euler a") == ("Euler a", None) and split_joint("Euler SGMUniform") == ("Euler", "SGMUniform")
    w = []
    assert scheduled("DPM++ 2M Karras", "Exponential", "scheduler", w) == ("dpmpp_2m", "exponential") and w == []
    assert scheduled("DPM++ 2M Karras", "Exponential", "Schedule type", w, paste=True) == ("dpmpp_2m_karras",
                                                                                           "automatic")
    assert w == ["Schedule type 'Exponential': ignored, 'DPM++ 2M Karras' names its schedule, as A1111 reads it"]
    assert scheduled("DPM++ 2M", None, "f", [], paste=True) == ("dpmpp_2m", "automatic")  # (fastsd's own infotext)
    assert scheduled("DPM++ 2M", None, "f", []) == ("dpmpp_2m_karras", "automatic")  # (the API: Automatic)
    assert scheduled("DPM++ 3M SDE Exponential", None, "f", [], paste=True) == ("dpmpp_3m_sde", "exponential")
    with pytest.raises(ValueError, match="unknown sampler 'Heun\\+\\+'"):
        scheduled("Heun++ Karras", None, "f", [])
    # the hires pass: (sampler, its own type, or None where the first pass's type gives it the schedule asked for)
    w = []  # first pass the sampler's own, hires Exponential: its own type
    assert hires_scheduled("Euler", "Exponential", "automatic", "hr_scheduler", w) == ("euler", "exponential")
    assert hires_scheduled("Euler", "Automatic", "karras", "hr_scheduler", w) == ("euler", "automatic") and w == []
    w = []  # Euler a + Karras (a type), hires DPM++ 2M (Automatic: Karras, its twin): both passes Karras
    assert hires_scheduled("DPM++ 2M", None, "karras", "hr_scheduler", w) == ("dpmpp_2m_karras", None) and w == []
    # first pass Exponential, hires DPM++ 2M Karras: its twin on its own Karras schedule (the type would replace it)
    assert hires_scheduled("DPM++ 2M Karras", None, "exponential", "hr_scheduler", w) == ("dpmpp_2m_karras",
                                                                                         "automatic") and w == []
    assert hires_scheduled("Euler", "Exponential", "exponential", "hr_scheduler", w) == ("euler", None)


def test_karras_names_and_types_agree(pipe):
    """A `_karras` sampler names its schedule: with another type it is refused (its infotext would say Karras);
    with Karras it is its own twin's schedule."""
    with pytest.raises(ValueError, match="sampler dpmpp_2m_karras names the Karras schedule; with schedule type "
                                         "'exponential' give dpmpp_2m"):
        GenerationSettings(sampler="DPM++ 2M Karras", schedule_type="exponential").validate()
    with pytest.raises(ValueError, match="hires_sampler: sampler euler_karras names the Karras schedule"):
        GenerationSettings(sampler="euler", hires_sampler="euler_karras", schedule_type="beta").validate()
    GenerationSettings(sampler="DPM++ 2M Karras", schedule_type="Karras").validate()
    assert torch.equal(pipe.schedule("dpmpp_2m_karras", 4, "karras").timesteps,
                       get_sampler("dpmpp_2m_karras").schedule(4).timesteps)


@pytest.mark.parametrize("a1111", ["DPM2", "DPM2 a", "DPM2 Karras", "DPM2 a Karras", "DPM++ 3M SDE Karras"])
def test_a1111_discard_samplers_on_karras_in_both_hires_passes(pipe, monkeypatch, a1111):
    """A1111's DPM2 / DPM2 a (Automatic = Karras, and the old joint names) and DPM++ 3M SDE with Karras walk the Karras
    levels of steps + 1 without the next-to-last (discard_next_to_last_sigma), in the first pass and in the hires
    pass's tail (setup_img2img_steps: sigmas[n - t_enc - 1:]); fastsd's own `_karras` twins, asked for by name, keep
    their diffusers schedules (KDPM2DiscreteScheduler(use_karras_sigmas=True))."""
    from fastsd.a1111 import hires_scheduled, scheduled
    from fastsd.pipeline import Pipeline

    sampler, kind = scheduled(a1111, None, "scheduler", [])
    assert kind == "karras" and not sampler.endswith("_karras")
    assert hires_scheduled(a1111, None, "automatic", "hr_scheduler", []) == (sampler, "karras")
    seen = []
    denoise = Pipeline.denoise
    monkeypatch.setattr(Pipeline, "denoise", lambda self, p, *a, **k: seen.append(p.schedule.sigmas.clone())
                        or denoise(self, p, *a, **k))
    im = pipe.generate("a cat", steps=4, width=64, height=48, guidance_scale=1.0, seed=2, progress=False,
                       sampler=sampler, schedule_type=kind, hires_scale=1.5, hires_strength=0.45)[0]

    def discard(n):
        s = a1111_sigmas("karras", n + 1).double()
        return torch.cat([s[:-2], s[-1:]])

    n, t_enc = int(4 / 0.45), 4 - 1  # A1111's setup_img2img_steps with the hires steps given
    torch.testing.assert_close(seen[0], discard(4), rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(seen[1], discard(n)[n - t_enc - 1:], rtol=2e-6, atol=1e-7)
    assert "Schedule type: Karras" in im.info["parameters"]
    twin = sampler + "_karras"
    for own in ("automatic", "karras"):
        assert torch.equal(pipe.schedule(twin, 4, own).sigmas, get_sampler(twin).schedule(4).sigmas)
    assert not torch.equal(pipe.schedule(sampler, 4, "karras").sigmas, get_sampler(twin).schedule(4).sigmas)


@pytest.mark.parametrize("twin", ["dpm2_karras", "dpm2_a_karras", "dpmpp_3m_sde_karras"])
def test_twins_without_an_a1111_name_read_back_as_themselves(pipe, twin):
    """The DPM2 / DPM2 a / DPM++ 3M SDE Karras twins' own schedule is no A1111 one (A1111's drops a level): their
    infotext names them by fastsd's name, read back as the twin (the same image), first pass and hires pass alike;
    A1111's joint name reads as A1111's schedule."""
    from fastsd.a1111 import scheduled
    from fastsd.infotext_settings import settings_from_infotext

    assert scheduled(A1111_NAMES[twin], None, "sampler", [], paste=True) == (twin.removesuffix("_karras"), "karras")
    for kw in ({"sampler": twin}, {"sampler": twin, "schedule_type": "karras"},
               {"sampler": "euler", "hires_sampler": twin, "hires_scale": 1.5, "hires_strength": 0.5}):
        im = pipe.generate("a cat", steps=3, width=64, height=48, seed=3, progress=False, **kw)[0]
        text = im.info["parameters"]
        assert f"ampler: {twin}," in text and A1111_NAMES[twin] not in text
        got, warnings = settings_from_infotext(text)
        assert warnings == [] and (got.get("hires_sampler") or got["sampler"]) == twin
        again = pipe.generate("a cat", width=64, height=48, progress=False, **{
            k: got[k] for k in ("steps", "seed", "sampler", "hires_sampler", "hires_scale", "hires_strength",
                                "schedule_type", "hires_schedule_type") if k in got})[0]
        assert again.tobytes() == im.tobytes()


@pytest.mark.parametrize("a1111, twin", [("DPM2 Karras", "dpm2_karras"), ("k_dpm_2_a_ka", "dpm2_a_karras"),
                                         ("DPM++ 3M SDE Karras", "dpmpp_3m_sde_karras")])
def test_a1111_joint_names_run_a1111s_schedule_everywhere(pipe, tmp_path, a1111, twin):
    """A1111's name of such a twin means A1111's sampler in the Python API and batch jobs too (as on the server and
    in --infotext): the sampler on the Karras type; the twin only by fastsd's name."""
    from fastsd.batch.jobs import Defaults, read_job_file

    base = twin.removesuffix("_karras")
    kw = dict(steps=3, width=64, height=48, seed=3, progress=False)
    named = pipe.generate("a cat", sampler=a1111, **kw)[0]
    assert named.tobytes() == pipe.generate("a cat", sampler=base, schedule_type="karras", **kw)[0].tobytes()
    assert named.tobytes() != pipe.generate("a cat", sampler=twin, **kw)[0].tobytes()
    hires = pipe.generate("a cat", sampler="euler", hires_sampler=a1111, hires_scale=1.5, **kw)[0]
    assert f"Hires sampler: {A1111_NAMES[base]}, Hires schedule type: Karras" in hires.info["parameters"]
    jobs = tmp_path / "j.jsonl"
    jobs.write_text(f'{{"prompt": "a", "sampler": "{a1111}"}}\n{{"prompt": "a", "sampler": "{twin}"}}\n')
    a, b = (j.settings for j in read_job_file(jobs, Defaults(steps=2, width=64, height=64)))
    assert (a.sampler, a.schedule_type, b.sampler, b.schedule_type) == (base, "karras", twin, "automatic")
