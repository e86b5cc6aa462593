"""Train a small pixel-space diffusion model built from fastsd's own UNet.

    python -m fastsd.train --dataset digits --conditional --out run/

Epsilon-prediction DDPM training with a fastsd.schedules noise schedule (SD1.x's scaled_linear by default), on
fastsd.models.unet.UNet with a small UNetConfig. Class conditioning goes through the UNet's cross-attention, as
text does in SD: a learned embedding per class (plus a "null" class) is the one-token context. With
--conditional, labels are replaced by the null class with probability --cond-drop (0.1), so the same model also predicts
unconditionally and classifier-free guidance works at sampling time; without it every label is the
null class (an unconditional model).

Run folder (--out):
  config.json             frozen configs (UNetConfig, SchedulerConfig, TrainConfig) and the dataset's facts
  model.safetensors       EMA weights (what fastsd.train.sample / fastsd.train.evaluate use)
  train_state.safetensors everything to resume: weights, EMA, AdamW moments, RNG states, data order; the
                          step, loss history and timings sit in its metadata, so one atomic file is the state
  loss.png                the loss curve
A run folder with a train_state.safetensors is resumed (same config; --steps may be raised); --fresh
starts over. Files are written atomically (temp file, then rename), config.json and model.safetensors before
train_state.safetensors, which commits a checkpoint: an interrupted save leaves the previous one intact. A NaN
loss or gradient stops the run (TrainingDiverged) before it reaches the weights; nothing is saved from it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from fastsd.config import SchedulerConfig, UNetConfig
from fastsd.cli import ArgumentParser, float_in, int_in, positive_int, require, thread_count, usage_error
from fastsd.files import atomic_write
from fastsd.train.datasets import (DATASETS, Dataset, DatasetError, available_memory, check_path, load_dataset,
                                   resize)

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.safetensors"
LOSS_PNG = "loss.png"
FORMAT = "fastsd-train-1"

# Noise schedules. Default: SD1.x's own "scaled_linear" (betas 0.00085..0.012, 1000 steps), the schedule the
# samplers in fastsd.samplers are built around. "linear" is DDPM's (Ho et al. 2020; betas 1e-4..0.02): it ends at
# alphas_cumprod[999] = 4e-5 (pure noise) where scaled_linear ends at 0.0047 (6.8% of the image left at t=999),
# which in theory suits 8x8 pixels better. Measured on digits (1000 steps, README) both train equally well
# (CFG 1: 96.2% vs 96.7% classifier accuracy, Frechet distance at the real-vs-real floor for both), so the
# SD schedule stays the default and --schedule linear is there to choose.
SCHEDULES = {
    "linear": SchedulerConfig(beta_start=1e-4, beta_end=0.02, beta_schedule="linear"),
    "scaled_linear": SchedulerConfig(),
}


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "digits"
    data_path: str | None = None
    image_size: int | None = None  # None: the dataset's own size (digits: 8)
    channels: int | None = None  # folder datasets only: force 1 or 3
    conditional: bool = False
    cond_drop: float = 0.1  # probability of the null class during conditional training (for CFG)
    schedule: str = "scaled_linear"
    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05  # cosine decay from lr to lr * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    save_every: int = 500
    log_every: int = 25


def default_unet_config(channels: int, image_size: int, *, model_channels: int = 32,
                        channel_mult: tuple[int, ...] | None = None, num_res_blocks: int = 2,
                        attention_levels: tuple[bool, ...] | None = None, num_heads: int = 4,
                        context_dim: int = 64, norm_groups: int = 8) -> UNetConfig:
    """The small UNet: two levels (8x8 and 4x4 for digits; a third for images of 24 px and more),
    self+cross attention at the lowest level and in the middle block, GroupNorm with 8 groups."""
    if channel_mult is None:
        channel_mult = (1, 2) if image_size < 24 else (1, 2, 2)
    if attention_levels is None:
        attention_levels = tuple(i == len(channel_mult) - 1 for i in range(len(channel_mult)))
    return UNetConfig(in_channels=channels, out_channels=channels, model_channels=model_channels,
                      channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks,
                      attention_levels=tuple(attention_levels), num_heads=num_heads, context_dim=context_dim,
                      norm_groups=norm_groups)


# --------------------------------------------------------------------------------------------- config file

def _jsonable(cfg) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def _from_json(cls, d: dict):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class RunConfig:
    unet: UNetConfig
    scheduler: SchedulerConfig
    train: TrainConfig
    num_classes: int  # 0 for an unconditional run; the null class is index num_classes
    class_names: tuple[str, ...]
    channels: int
    image_size: int

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "unet": _jsonable(self.unet), "scheduler": _jsonable(self.scheduler),
                           "train": _jsonable(self.train), "num_classes": self.num_classes,
                           "class_names": list(self.class_names), "channels": self.channels,
                           "image_size": self.image_size}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        d = json.loads(text)
        if not isinstance(d, dict):
            kind = {type(None): "null", list: "an array", str: "a string", bool: "a boolean"}.get(type(d), "a number")
            raise ValueError(f"not a fastsd training config (JSON {kind}, not an object)")
        if d.get("format") != FORMAT:
            raise ValueError(f"not a fastsd training config (format {d.get('format')!r}, expected {FORMAT!r})")
        for k in ("unet", "scheduler", "train"):
            if not isinstance(d.get(k), dict):
                raise ValueError(f"'{k}' is missing or not an object")
        run = cls(_from_json(UNetConfig, d["unet"]), _from_json(SchedulerConfig, d["scheduler"]),
                  _from_json(TrainConfig, d["train"]), int(d["num_classes"]), tuple(d["class_names"]),
                  int(d["channels"]), int(d["image_size"]))
        _check_types(run)
        check_config(run)
        return run


def load_run_config(run_dir: str) -> RunConfig:
    path = os.path.join(run_dir, CONFIG_FILE)
    try:
        with open(path) as f:
            return RunConfig.from_json(f.read())
    except FileNotFoundError:
        raise ValueError(f"{run_dir}: no {CONFIG_FILE} (not a training run folder)") from None
    except (OSError, KeyError, TypeError, ValueError, AttributeError) as e:  # JSONDecodeError is a ValueError
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: unreadable config ({msg})") from None


def _check_types(run: RunConfig) -> None:
    """A config.json edited by hand (or damaged) must not build a model from strings or nulls."""
    u, t = run.unet, run.train
    ints = {"unet.in_channels": u.in_channels, "unet.out_channels": u.out_channels,
            "unet.model_channels": u.model_channels, "unet.num_res_blocks": u.num_res_blocks,
            "unet.num_heads": u.num_heads, "unet.context_dim": u.context_dim, "unet.norm_groups": u.norm_groups,
            "train.steps": t.steps, "train.batch_size": t.batch_size, "channels": run.channels,
            "image_size": run.image_size, "scheduler.num_train_timesteps": run.scheduler.num_train_timesteps}
    for name, v in ints.items():
        if type(v) is not int or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if run.num_classes < 0 or u.in_channels != run.channels or u.out_channels != run.channels:
        raise ValueError("num_classes / channels do not match the UNet")
    if not u.channel_mult or any(type(m) is not int or m < 1 for m in u.channel_mult):
        raise ValueError(f"unet.channel_mult must be positive integers, got {list(u.channel_mult)!r}")
    if any(type(a) is not bool for a in u.attention_levels):
        raise ValueError(f"unet.attention_levels must be true/false values, got {list(u.attention_levels)!r}")
    if run.scheduler.beta_schedule not in ("linear", "scaled_linear"):
        raise ValueError(f"unknown scheduler.beta_schedule {run.scheduler.beta_schedule!r}")


class TrainingDiverged(Exception):
    """The loss or the gradient turned non-finite at `step` (checked before the optimizer step, so the weights
    stay finite and nothing is saved from the diverged step on)."""

    def __init__(self, step: int, what: str, value: float):
        super().__init__(f"training diverged: the {what} is {value} at step {step} (try a lower --lr)")
        self.step = step


def build_model(run: RunConfig):
    from fastsd.train.classcond import ClassConditionedUNet

    return ClassConditionedUNet(run.unet, run.num_classes)


# --------------------------------------------------------------------------------------------- files

def save_tensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; ValueError (one line, naming the file) when it is
    missing, not a regular file (a folder or a FIFO, which would block), truncated or otherwise unreadable."""
    from safetensors import SafetensorError, safe_open

    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not a regular file")
    out = {}
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                out[k] = f.get_tensor(k)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a readable safetensors file ({msg})") from None
    return out, meta


def load_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], path: str) -> None:
    """load_state_dict with a one-line ValueError naming `path` for missing, extra or mis-shaped tensors
    (a checkpoint of a model with other sizes) instead of torch's multi-line RuntimeError."""
    want = module.state_dict()
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        n = len(missing) + len(extra)
        raise ValueError(f"{path}: not a checkpoint of this model ({what}{f' and {n - 1} more' if n > 1 else ''})")
    for k, v in want.items():
        t = tensors[k]
        if tuple(t.shape) != tuple(v.shape) or t.dtype != v.dtype:
            raise ValueError(f"{path}: holds a model of other sizes ({k}: {tuple(t.shape)} {t.dtype}, this run's "
                             f"model has {tuple(v.shape)} {v.dtype})")
    module.load_state_dict(tensors)


# --------------------------------------------------------------------------------------------- training

class Trainer:
    """The training state and one step of it; `save`/`load` round-trip everything, so a resumed run
    continues exactly (same batches, noise and weights) as if it had never stopped."""

    def __init__(self, run: RunConfig, data: Dataset):
        self.run, self.cfg = run, run.train
        torch.manual_seed(self.cfg.seed)
        self.model = build_model(run)
        self.ema = build_model(run)
        self.ema.load_state_dict(self.model.state_dict())
        self.ema.requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.gen = torch.Generator().manual_seed(self.cfg.seed + 1)  # batches, timesteps, noise, label dropout
        from fastsd.schedules import alphas_cumprod

        ac = alphas_cumprod(run.scheduler).double()
        self.sqrt_ac = ac.sqrt().float()
        self.sqrt_1m_ac = (1 - ac).sqrt().float()
        self.x = torch.from_numpy(data.train_x)
        self.y = torch.from_numpy(data.train_y)
        self.perm = torch.randperm(len(self.x), generator=self.gen)
        self.pos = 0
        self.step = 0
        self.losses: list[tuple[int, float]] = []  # (step, mean loss over the last log_every steps)
        self.wall = 0.0  # seconds spent training, summed over resumed sessions
        self.cpu = 0.0

    # -- data -------------------------------------------------------------------------------------------

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = []
        need = self.cfg.batch_size
        while need:
            if self.pos == len(self.perm):
                self.perm, self.pos = torch.randperm(len(self.x), generator=self.gen), 0
            take = self.perm[self.pos:self.pos + need]
            idx.append(take)
            self.pos += len(take)
            need -= len(take)
        idx = torch.cat(idx)
        return self.x[idx], self.y[idx]

    def lr_at(self, step: int) -> float:
        c = self.cfg
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        p = min(1.0, (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps))
        return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))

    # -- one step ---------------------------------------------------------------------------------------

    def train_step(self) -> float:
        x0, y = self.next_batch()
        B = x0.shape[0]
        null = self.run.num_classes
        if self.run.num_classes == 0:
            labels = torch.full((B,), null, dtype=torch.long)
        else:
            drop = torch.rand(B, generator=self.gen) < self.cfg.cond_drop
            labels = torch.where(drop, torch.full_like(y, null), y)
        t = torch.randint(0, self.run.scheduler.num_train_timesteps, (B,), generator=self.gen)
        noise = torch.randn(x0.shape, generator=self.gen)
        xt = self.sqrt_ac[t][:, None, None, None] * x0 + self.sqrt_1m_ac[t][:, None, None, None] * noise
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step)
        loss = torch.nn.functional.mse_loss(self.model(xt, t.float(), labels), noise)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDiverged(self.step + 1, "loss", value)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip or math.inf)
        if not math.isfinite(float(norm)):
            raise TrainingDiverged(self.step + 1, "gradient norm", float(norm))
        self.opt.step()
        self.step += 1
        self.update_ema()
        return value

    @torch.no_grad()
    def update_ema(self) -> None:
        d = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))  # warm-up: early EMA follows the model
        ema_p = list(self.ema.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in self.model.parameters()], 1.0 - d)
        for eb, b in zip(self.ema.buffers(), self.model.buffers()):
            eb.copy_(b)

    # -- checkpoints ------------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        t = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        t.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        for i, st in self.opt.state_dict()["state"].items():
            for k, v in st.items():
                t[f"optim.{i}.{k}"] = torch.as_tensor(v)
        t["rng.torch"] = torch.get_rng_state()
        t["rng.data"] = self.gen.get_state()
        t["data.perm"] = self.perm
        return t

    def save(self, out: str) -> None:
        """config.json, model.safetensors, then train_state.safetensors: each file is atomic and the state, written
        last, commits the checkpoint (a process killed in between resumes from the previous state and writes
        the same files again), so model.safetensors is never older than the state."""
        meta = {"step": self.step, "pos": self.pos, "losses": self.losses, "wall_seconds": self.wall,
                "cpu_seconds": self.cpu, "param_groups": self.opt.state_dict()["param_groups"]}
        atomic_write(os.path.join(out, CONFIG_FILE), lambda tmp: open(tmp, "w").write(self.run.to_json()))
        save_tensors(os.path.join(out, MODEL_FILE), self.ema.state_dict(),
                     {"step": str(self.step), "format": FORMAT})
        save_tensors(os.path.join(out, STATE_FILE), self.state_tensors(), {"state": json.dumps(meta)})

    def load(self, out: str) -> None:
        """Restore the state saved in `out`. ValueError (one line, naming the file) for a missing, damaged or
        foreign state file; everything is checked before any of this trainer's state is replaced."""
        path = os.path.join(out, STATE_FILE)
        tensors, meta = load_tensors(path)

        def bad(what: str):
            return ValueError(f"{path}: {what}")

        try:
            state = json.loads(meta["state"])
        except KeyError:
            raise bad("no 'state' metadata (not a fastsd training state)") from None
        except ValueError:
            raise bad("its 'state' metadata is not valid JSON") from None
        if not isinstance(state, dict):
            raise bad("its 'state' metadata is not a JSON object")

        def prefixed(p):
            return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}

        for name in ("rng.torch", "rng.data", "data.perm"):
            if name not in tensors:
                raise bad(f"no {name} tensor (not a fastsd training state)")
        try:
            step, pos = state["step"], state["pos"]
            losses = [(int(s), float(l)) for s, l in state["losses"]]
            wall, cpu = float(state["wall_seconds"]), float(state["cpu_seconds"])
            groups = state["param_groups"]
            if type(step) is not int or type(pos) is not int or step < 0 or not isinstance(groups, list):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise bad("its 'state' metadata is damaged (step, pos, losses, timings or param_groups)") from None
        perm = tensors["data.perm"]
        n = len(self.x)
        if perm.dtype != torch.int64 or tuple(perm.shape) != (n,) or not 0 <= pos <= n or \
                not torch.equal(torch.sort(perm).values, torch.arange(n)):
            raise bad(f"its data order is not for this dataset ({n} training images)")
        for name, gen_state in (("rng.torch", torch.get_rng_state()), ("rng.data", self.gen.get_state())):
            t = tensors[name]
            if t.dtype != gen_state.dtype or t.shape != gen_state.shape:
                raise bad(f"{name} is not a CPU random generator state")
        model_t, ema_t = prefixed("model."), prefixed("ema.")
        opt_state: dict[int, dict] = {}
        try:
            for k, v in prefixed("optim.").items():
                i, name = k.split(".", 1)
                opt_state.setdefault(int(i), {})[name] = v
        except ValueError:
            raise bad("damaged optimizer state names") from None
        # check the weights and optimizer state on copies first, so a bad file changes nothing here
        probe = build_model(self.run)
        load_weights(probe, model_t, path)
        load_weights(probe, ema_t, path)
        params = list(self.model.parameters())
        for i, st in opt_state.items():
            if not 0 <= i < len(params) or any(k in ("exp_avg", "exp_avg_sq") and v.shape != params[i].shape
                                               for k, v in st.items()):
                raise bad("its optimizer state is for a model of other sizes")
        try:
            probe_opt = torch.optim.AdamW(probe.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
            probe_opt.load_state_dict({"state": opt_state, "param_groups": groups})
        except (ValueError, TypeError, KeyError, RuntimeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise bad(f"its optimizer state does not fit this model ({msg})") from None
        self.model.load_state_dict(model_t)
        self.ema.load_state_dict(ema_t)
        self.opt.load_state_dict({"state": opt_state, "param_groups": groups})
        torch.set_rng_state(tensors["rng.torch"])
        self.gen.set_state(tensors["rng.data"])
        self.perm = perm
        self.pos, self.step = pos, step
        self.losses = losses
        self.wall, self.cpu = wall, cpu


def plot_losses(losses: list[tuple[int, float]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if losses:
        s, l = zip(*losses)
        ax.plot(s, l, lw=1)
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("eps MSE (mean per log interval)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def cpu_seconds() -> float:
    """CPU time of this process, all threads (user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def train(run: RunConfig, data: Dataset, out: str, *, resume: bool = True, progress: bool = True,
          trainer: Trainer | None = None, created: bool | None = None) -> dict:
    """Train (or resume) into folder `out`; returns a summary dict (also written to train_summary.json).
    `trainer`: one the caller already built (and loaded from `out`, to resume); `created`: the caller made `out`
    for this run (default: whether it is missing now). A folder created for the run is removed again when it fails
    before its first checkpoint is written (nothing half-made is left behind); a failure other than Ctrl-C /
    SIGTERM (TrainingDiverged: a NaN loss) saves nothing, so the previous checkpoint stays as it was."""
    if created is None:
        created = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    saved = False
    try:
        t_start, c_start = time.perf_counter(), cpu_seconds()
        if trainer is None:
            trainer = Trainer(run, data)
            if resume and os.path.exists(os.path.join(out, STATE_FILE)):
                trainer.load(out)
        resumed_from = trainer.step
        # --fresh over an old run: its state goes just before the first save (until then the old run resumes as
        # it was), so the new config.json never sits beside the old run's state
        stale = [os.path.join(out, STATE_FILE)] if not resume and os.path.lexists(os.path.join(out, STATE_FILE)) else []
        cfg = run.train
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=trainer.step, disable=not progress, desc="train", dynamic_ncols=True)
        window: list[float] = []
        last_saved = trainer.step
        wall0, cpu0 = trainer.wall - time.perf_counter(), trainer.cpu - cpu_seconds()

        def checkpoint():
            nonlocal saved, last_saved
            trainer.wall, trainer.cpu = wall0 + time.perf_counter(), cpu0 + cpu_seconds()
            while stale:
                os.unlink(stale.pop())
            trainer.save(out)
            saved, last_saved = True, trainer.step

        ok = False
        try:
            while trainer.step < cfg.steps:
                window.append(trainer.train_step())
                bar.update(1)
                if trainer.step % cfg.log_every == 0 or trainer.step == cfg.steps:
                    trainer.losses.append((trainer.step, float(np.mean(window))))
                    bar.set_postfix(loss=f"{trainer.losses[-1][1]:.4f}", lr=f"{trainer.lr_at(trainer.step - 1):.2e}")
                    window = []
                if cfg.save_every and trainer.step % cfg.save_every == 0 and trainer.step < cfg.steps:
                    checkpoint()
            ok = True
        except KeyboardInterrupt:
            ok = True  # Ctrl-C / SIGTERM: save below, the run resumes from there
            raise
        finally:
            bar.close()
            if ok:
                trainer.wall, trainer.cpu = wall0 + time.perf_counter(), cpu0 + cpu_seconds()
                if trainer.step != last_saved or not os.path.exists(os.path.join(out, MODEL_FILE)):
                    checkpoint()
                saved = True
                mode = "class-conditional" if run.num_classes else "unconditional"
                plot_losses(trainer.losses, os.path.join(out, LOSS_PNG),
                            f"{cfg.dataset} {mode}, {run.scheduler.beta_schedule} schedule, batch {cfg.batch_size}")
    except BaseException:
        if created and not saved:
            shutil.rmtree(out, ignore_errors=True)
        raise
    tail = [l for _, l in trainer.losses[-8:]]
    final = float(np.mean(tail)) if tail else None
    if final is not None and not math.isfinite(final):
        print("warning: the loss is not finite (training diverged; try a lower --lr)", file=sys.stderr)
        final = None
    summary = {
        "steps": trainer.step, "resumed_from": resumed_from,
        "final_loss": final,
        "train_wall_seconds": round(trainer.wall, 2), "train_cpu_seconds": round(trainer.cpu, 2),
        "session_wall_seconds": round(time.perf_counter() - t_start, 2),
        "session_cpu_seconds": round(cpu_seconds() - c_start, 2),
        "torch_threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
    }
    atomic_write(os.path.join(out, "train_summary.json"),
                 lambda tmp: open(tmp, "w").write(json.dumps(summary, indent=2)))
    return summary


# --------------------------------------------------------------------------------------------- CLI

# Sane upper bounds, refused at argument parsing (a typo like --image-size 100000 would otherwise run out of
# memory); what fits in memory below them is estimated by check_memory before anything is created.
MAX_IMAGE_SIZE = 1024
MAX_BATCH_SIZE = 65536
MAX_WIDTH = 4096  # --model-channels, --context-dim
MAX_LEVELS = 8
MAX_MULT = 64
MAX_RES_BLOCKS = 32
MAX_SEED = 2 ** 63 - 2  # torch's generators take 64-bit seeds; the data generator uses seed + 1


def _int_tuple(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in s.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _channel_mult(s: str) -> tuple[int, ...]:
    v = _int_tuple(s)
    if not v or len(v) > MAX_LEVELS or any(not 1 <= m <= MAX_MULT for m in v):
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_LEVELS} comma-separated width multipliers from 1 to "
                                         f"{MAX_MULT} (one per UNet level, e.g. 1,2), got {s!r}")
    return v


def _attention_levels(s: str) -> tuple[int, ...]:
    v = _int_tuple(s)
    if not v or any(a not in (0, 1) for a in v):
        raise argparse.ArgumentTypeError(f"expected one 0 or 1 per UNet level (e.g. 0,1: attention at the second "
                                         f"level only), got {s!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = ArgumentParser(prog="python -m fastsd.train", description="Train a small pixel-space DDPM "
                       "(fastsd UNet; class-conditional through cross-attention, with CFG dropout).")
    p.add_argument("--dataset", default="digits", choices=DATASETS)
    p.add_argument("--data-path", help="mnist: folder with the IDX files (or the images file); cifar10: the "
                   "cifar-10-batches-py folder; folder: root with one subfolder per class")
    p.add_argument("--image-size", type=int_in(1, MAX_IMAGE_SIZE), default=None, help="resize to this "
                   f"square size, at most {MAX_IMAGE_SIZE} (default: the dataset's own; 32 for folder datasets)")
    p.add_argument("--channels", type=int, choices=[1, 3], default=None, help="folder datasets: force grey/RGB")
    p.add_argument("--conditional", action="store_true", help="class-conditional (else unconditional)")
    p.add_argument("--cond-drop", type=float_in(0.0, 1.0), default=d.cond_drop,
                   help="null-class probability for CFG, in [0, 1)")
    p.add_argument("--schedule", default=d.schedule, choices=sorted(SCHEDULES),
                   help="scaled_linear: SD1.x betas 0.00085..0.012 (default); linear: DDPM betas 1e-4..0.02")
    p.add_argument("--steps", type=positive_int, default=d.steps,
                   help="total optimizer steps (a resumed run continues)")
    p.add_argument("--batch-size", type=int_in(1, MAX_BATCH_SIZE), default=d.batch_size)
    p.add_argument("--lr", type=float_in(0.0, lo_open=True), default=d.lr, help="peak learning rate (> 0)")
    p.add_argument("--warmup-steps", type=int_in(0), default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float_in(0.0), default=d.weight_decay)
    p.add_argument("--ema-decay", type=float_in(0.0, 1.0), default=d.ema_decay, help="in [0, 1)")
    p.add_argument("--seed", type=int_in(0, MAX_SEED), default=d.seed)
    p.add_argument("--save-every", type=int_in(0), default=d.save_every,
                   help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--log-every", type=positive_int, default=d.log_every)
    p.add_argument("--model-channels", type=int_in(1, MAX_WIDTH), default=32)
    p.add_argument("--channel-mult", type=_channel_mult, default=None, help="e.g. 1,2 (default: 1,2 below 24 px, "
                   "else 1,2,2)")
    p.add_argument("--num-res-blocks", type=int_in(1, MAX_RES_BLOCKS), default=2)
    p.add_argument("--attention-levels", type=_attention_levels, default=None, help="0/1 per --channel-mult "
                   "level (default: the lowest level only)")
    p.add_argument("--num-heads", type=positive_int, default=4, help="must divide every level's width")
    p.add_argument("--context-dim", type=int_in(1, MAX_WIDTH), default=64)
    p.add_argument("--norm-groups", type=positive_int, default=8, help="must divide every level's width")
    p.add_argument("--out", default="run", help="run folder (created; resumed when it holds a checkpoint)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="require a checkpoint in --out and continue it")
    g.add_argument("--fresh", action="store_true", help="ignore a checkpoint in --out and start over")
    p.add_argument("--threads", type=thread_count, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(args: argparse.Namespace, data: Dataset, image_size: int | None = None) -> RunConfig:
    """The run's configs; `image_size` (default: the data's) is the size the data will be trained at."""
    size = image_size or data.image_size
    tc = TrainConfig(dataset=args.dataset, data_path=os.path.abspath(args.data_path) if args.data_path else None,
                     image_size=args.image_size, channels=args.channels, conditional=args.conditional,
                     cond_drop=args.cond_drop, schedule=args.schedule, steps=args.steps, batch_size=args.batch_size,
                     lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                     ema_decay=args.ema_decay, seed=args.seed, save_every=args.save_every, log_every=args.log_every)
    attn = None if args.attention_levels is None else tuple(bool(v) for v in args.attention_levels)
    if attn is not None:
        mult = args.channel_mult or default_unet_config(1, size).channel_mult
        if len(attn) != len(mult):
            raise ValueError(f"--attention-levels has {len(attn)} entries but the UNet has {len(mult)} levels "
                             f"(--channel-mult {','.join(map(str, mult))}): give one 0/1 per level")
    unet = default_unet_config(data.channels, size, model_channels=args.model_channels,
                               channel_mult=args.channel_mult, num_res_blocks=args.num_res_blocks,
                               attention_levels=attn, num_heads=args.num_heads, context_dim=args.context_dim,
                               norm_groups=args.norm_groups)
    return RunConfig(unet, SCHEDULES[args.schedule], tc, data.num_classes if args.conditional else 0,
                     tuple(data.class_names), data.channels, size)


def check_config(run: RunConfig) -> None:
    u, t = run.unet, run.train
    down = 2 ** (len(u.channel_mult) - 1)
    if run.image_size % down:
        raise ValueError(f"image size {run.image_size} is not divisible by {down} ({len(u.channel_mult)} UNet levels)")
    for c in (u.model_channels, *(u.model_channels * m for m in u.channel_mult)):
        if c % u.norm_groups or c % u.num_heads:
            raise ValueError(f"UNet width {c} (--model-channels {u.model_channels} x --channel-mult) must be divisible "
                             f"by --norm-groups {u.norm_groups} and --num-heads {u.num_heads}")
    if t.steps < 1 or t.batch_size < 1:
        raise ValueError("--steps and --batch-size must be at least 1")
    if not 0 <= t.cond_drop < 1:
        raise ValueError(f"--cond-drop must be in [0, 1), got {t.cond_drop}")
    if len(u.attention_levels) != len(u.channel_mult):
        raise ValueError("--attention-levels needs one entry per --channel-mult level")
    if not (math.isfinite(t.lr) and t.lr > 0 and math.isfinite(t.weight_decay) and t.weight_decay >= 0
            and 0 <= t.ema_decay < 1 and t.warmup_steps >= 0 and t.save_every >= 0 and t.log_every >= 1):
        raise ValueError("lr, weight_decay, ema_decay, warmup_steps, save_every or log_every out of range")


def estimate_memory(run: RunConfig, n_images: int) -> int:
    """A lower bound of the bytes a training step needs: the data (train + held-out), the weights with their
    gradients, AdamW moments and EMA copy, and the activations kept for the backward pass."""
    u, s = run.unet, run.image_size
    acts = params = 0
    last = len(u.channel_mult) - 1
    for level, m in enumerate(u.channel_mult):
        ch, r2 = u.model_channels * m, max(1, s // 2 ** level) ** 2
        blocks = 2 * u.num_res_blocks + 1 + (2 if level == last else 0)  # down + up (+ middle) res blocks
        n_attn = (2 * u.num_res_blocks + 1 if u.attention_levels[level] else 0) + (level == last)
        acts += (4 * blocks + 4 * n_attn) * ch * r2
        params += 18 * blocks * ch * ch + 8 * n_attn * ch * ch
    return 4 * (run.train.batch_size * acts + 5 * params + n_images * run.channels * s * s)


def check_memory(run: RunConfig, n_images: int) -> None:
    need, have = estimate_memory(run, n_images), available_memory()
    if have is not None and need > have:
        raise ValueError(f"training needs at least {need / 2 ** 30:.1f} GiB of memory (--batch-size "
                         f"{run.train.batch_size}, image size {run.image_size}, --model-channels "
                         f"{run.unet.model_channels}) but {have / 2 ** 30:.1f} GiB is available: use smaller values")


FREE_ON_RESUME = ("steps", "save_every", "log_every")  # TrainConfig fields a resumed run may change


def changed_options(old: RunConfig, new: RunConfig) -> str:
    """The options that differ between a run folder's config and this command's, as '--lr 0.002 there, 0.001 now'
    ('' when none but FREE_ON_RESUME do)."""
    pairs = [(f"--{f.name.replace('_', '-')}", getattr(old.train, f.name), getattr(new.train, f.name))
             for f in dataclasses.fields(TrainConfig) if f.name not in FREE_ON_RESUME]
    pairs += [(f"--{f.name.replace('_', '-')}", getattr(old.unet, f.name), getattr(new.unet, f.name))
              for f in dataclasses.fields(UNetConfig)]
    pairs += [("--schedule", old.scheduler, new.scheduler), ("classes", old.num_classes, new.num_classes)]

    def show(v):
        return ",".join(str(int(x)) for x in v) if isinstance(v, tuple) else getattr(v, "beta_schedule", v)

    return "; ".join(f"{flag} {show(a)} there, {show(b)} now" for flag, a, b in pairs if a != b)


def unused_option(args: argparse.Namespace) -> str | None:
    """A one-line reason when an option the chosen dataset does not use is given (it would be ignored: with
    --data-path but no --dataset, a run would train on digits)."""
    if args.dataset == "digits" and args.data_path:
        return "--data-path: the digits dataset is built in (scikit-learn's); for your images add --dataset folder"
    if args.channels and args.dataset != "folder":
        return f"--channels: only for --dataset folder ({args.dataset} has its own channels)"
    return None


def check_out(out: str) -> str | None:
    """A one-line reason why --out can't be a run folder (None when it may be): a file, under a file."""
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out}: exists and is not a folder"
    parent = os.path.dirname(os.path.abspath(out))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        return f"--out {out}: {parent} is a file, not a folder"
    return None


def make_out(out: str) -> bool:
    """Create --out (and check that files can be written in it); True when this call created it. OSError as a
    one-line ValueError, removing what this call created."""
    created = not os.path.isdir(out)
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".fastsd-", suffix=".part", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        if created and os.path.isdir(out):
            shutil.rmtree(out, ignore_errors=True)
        raise ValueError(f"--out {out}: can't write there ({e.strerror or e})") from None
    return created


def lock_out(out: str) -> int:
    """An exclusive lock on the run folder (flock on the folder itself: no file is added), held until the fd is
    closed, so two trainers never write one run; then the temp files of a killed save (`.fastsd-*.part`, a
    minute old: not a sample/evaluate write in progress) are removed. ValueError (one line) when it is taken."""
    import fcntl
    import glob

    try:
        fd = os.open(out, os.O_RDONLY)
    except OSError as e:
        raise ValueError(f"--out {out}: can't open it ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        busy = isinstance(e, BlockingIOError)
        raise ValueError(f"--out {out}: " + ("another fastsd.train run is writing there" if busy else
                                            f"can't lock it ({e.strerror or e})")) from None
    for part in glob.glob(os.path.join(glob.escape(out), ".fastsd-*.part")):
        try:
            if time.time() - os.path.getmtime(part) > 60:
                os.unlink(part)
        except OSError:
            pass
    return fd


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or isinstance(e, getattr(torch, "OutOfMemoryError", ())) or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e).lower()))


def _out_of_memory(e: BaseException, when: str) -> int:
    """An out-of-memory error as one `error:` line (exit status 2); any other error is raised again."""
    if not _is_oom(e):
        raise e
    print(f"error: out of memory {when} ({_one_line(e)}); use a smaller --batch-size, --image-size or "
          "--model-channels", file=sys.stderr)
    return 2


def _kept(out: str) -> str:
    """What a failed session left in `out`: the step of its checkpoint, or nothing."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.path.join(out, STATE_FILE), framework="pt") as f:
            step = json.loads(f.metadata()["state"])["step"]
    except (SafetensorError, OSError, ValueError, KeyError, TypeError):
        return "nothing was saved"
    return f"the checkpoint in {out} (step {step}) was kept"


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    why = unused_option(args) or check_path(args.dataset, args.data_path) or check_out(args.out)
    if why:
        usage_error(parser, why)
    state = os.path.join(args.out, STATE_FILE)
    if args.resume and not os.path.lexists(state):
        usage_error(parser, f"--resume: no {STATE_FILE} in {args.out}")
    if args.threads:
        torch.set_num_threads(args.threads)
    created = False
    try:
        require("sklearn", "train")
        require("matplotlib", "train")
        # non-folder datasets are read at their own size and resized only after the memory check below
        folder = args.dataset == "folder"
        data = load_dataset(args.dataset, args.data_path, args.image_size if folder else None, args.channels)
        run = config_from_args(args, data, args.image_size)
        check_config(run)
        check_memory(run, len(data.train_x) + len(data.test_x))
        if run.image_size != data.image_size:
            data.train_x, data.test_x = resize(data.train_x, run.image_size), resize(data.test_x, run.image_size)
        trainer = Trainer(run, data)
        if not args.fresh and os.path.lexists(state):
            changed = changed_options(load_run_config(args.out), run)
            if changed:
                raise ValueError(f"{args.out} holds a run with other settings ({changed}); use the same options (only "
                                 f"--steps, --save-every, --log-every may change), another --out, or --fresh")
            trainer.load(args.out)  # a damaged or foreign state file is refused here, before anything is written
        created = make_out(args.out)
        lock = lock_out(args.out)
        if not args.fresh and os.path.lexists(state):
            print(f"resuming {args.out} from its checkpoint", file=sys.stderr)
            if trainer.step >= run.train.steps:
                print(f"{args.out} is already at step {trainer.step} (--steps {run.train.steps}): nothing to train; "
                      f"a larger --steps extends it", file=sys.stderr)
    except (DatasetError, ValueError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        return _out_of_memory(e, "preparing the run")
    except KeyboardInterrupt:  # Ctrl-C while the data loads: nothing was written yet
        if created:
            shutil.rmtree(args.out, ignore_errors=True)
        print("interrupted before training started; nothing was written", file=sys.stderr)
        return 130
    import signal
    import threading

    def stop(signum, frame):  # SIGTERM (and SIGINT, even when started in the background) save, then stop
        for sig in handlers:  # a second Ctrl-C must not break off that save (kill -9 still does, atomically)
            signal.signal(sig, signal.SIG_IGN)
        print(f"stopping: saving the checkpoint in {args.out}", file=sys.stderr)
        raise KeyboardInterrupt

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        summary = train(run, data, args.out, resume=not args.fresh, progress=not args.no_progress, trainer=trainer,
                        created=created)
    except KeyboardInterrupt:
        print(f"interrupted; the checkpoint in {args.out} resumes the run", file=sys.stderr)
        return 130
    except TrainingDiverged as e:
        print(f"error: {e}; {_kept(args.out)}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        return _out_of_memory(e, "while training")
    except OSError as e:
        print(f"error: can't write the run to {args.out} ({e.strerror or _one_line(e)})", file=sys.stderr)
        return 2
    finally:
        os.close(lock)
        for sig, h in handlers.items():
            signal.signal(sig, h)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
