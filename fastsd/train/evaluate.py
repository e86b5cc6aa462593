"""Evaluate a fastsd.train run: does a classifier recognise the generated classes, and how far are the
samples from real images in that classifier's feature space?

    python -m fastsd.train.evaluate run/ [--cfg-scale 3] [--sampler ddim --steps 50] [--n-per-class 100]

1. A classifier is trained on the REAL training split of the run's dataset: scikit-learn's MLPClassifier
   with one hidden layer of 64 ReLU units on the raw pixels in [-1, 1] (a few seconds on digits). Its
   accuracy on the real held-out split is printed as a sanity check (digits: ~97%).
2. --n-per-class samples of every class are drawn (fastsd samplers, CFG with the null class as uncond) and
   labelled by the classifier; per-class accuracy = share of class-c samples the classifier calls c.
   An unconditional run gets the class histogram of its samples instead.
3. Frechet distance (FID-style) between real held-out images and the samples, computed on the classifier's
   64 hidden activations: the same formula as FID, |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^1/2), with a
   digit classifier standing in for Inception (Inception features mean nothing on 8x8 greys, and the hidden
   layer of a classifier trained on this data is the feature space the classes separate in). Small samples
   bias a Frechet distance upwards, so the floor and the model's distance are measured at the SAME sizes:
   the held-out set is split into random halves A and B; floor = FD(A, B), model = FD(A, G) with G a random
   subset of the samples as large as B (with fewer samples than that, A, B and G are all cut to their number);
   both are averaged over --fd-repeats random splits. FD(all held-out,
   all samples) is reported too.
Prints a markdown table and writes JSON (--json, default RUN/eval.json).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from fastsd.cli import (ArgumentParser, HelpFormatter, add_run_sampling_args, float_in, int_in, parse_run_args,
                        require, usage_error)

HIDDEN = 64
MIN_FD_HALF = 2  # a covariance needs two samples
MAX_CLASSIFIER_TRAIN = 10000  # subsample big datasets (MNIST, CIFAR) for the scikit-learn classifier


# --------------------------------------------------------------------------------------------- classifier

class FeatureClassifier:
    """MLP on flattened pixels; .predict for labels, .features for the hidden-layer activations."""

    def __init__(self, seed: int = 0):
        from sklearn.neural_network import MLPClassifier

        self.clf = MLPClassifier(hidden_layer_sizes=(HIDDEN,), alpha=1e-3, max_iter=600, random_state=seed)

    def fit(self, x: np.ndarray, y: np.ndarray, seed: int = 0) -> "FeatureClassifier":
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        if len(x) > MAX_CLASSIFIER_TRAIN:
            idx = np.random.default_rng(seed).choice(len(x), MAX_CLASSIFIER_TRAIN, replace=False)
            x, y = x[idx], y[idx]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.clf.fit(self._flat(x), y)
        return self

    @staticmethod
    def _flat(x) -> np.ndarray:
        x = x.numpy() if isinstance(x, torch.Tensor) else x
        return x.reshape(len(x), -1).astype(np.float64)

    def predict(self, x) -> np.ndarray:
        return self.clf.predict(self._flat(x))

    def features(self, x) -> np.ndarray:
        h = self._flat(x) @ self.clf.coefs_[0] + self.clf.intercepts_[0]
        return np.maximum(h, 0.0)


# --------------------------------------------------------------------------------------------- Frechet distance

def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) for feature rows f1 (n1, d), f2 (n2, d).
    Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2), a symmetric PSD form (no complex sqrtm)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    r1 = _sqrtm_psd(s1)
    w = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_sqrt = float(np.sqrt(np.clip(w, 0, None)).sum())
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def fd_with_floor(real: np.ndarray, gen: np.ndarray, repeats: int = 10, seed: int = 0) -> dict:
    """Model FD and real-vs-real floor at equal sample sizes (see the module doc)."""
    rng = np.random.default_rng(seed)
    half = len(real) // 2
    n = min(half, len(gen))  # the sample size of all three sets: half the held-out images, fewer if fewer samples
    floor, model = [], []
    for _ in range(repeats):
        p = rng.permutation(len(real))
        a, b = real[p[:n]], real[p[half:half + n]]
        g = gen[rng.choice(len(gen), size=n, replace=False)]
        floor.append(frechet_distance(a, b))
        model.append(frechet_distance(a, g))
    return {"fd": float(np.mean(model)), "fd_std": float(np.std(model)), "floor": float(np.mean(floor)),
            "floor_std": float(np.std(floor)), "fd_full": frechet_distance(real, gen), "half_size": n,
            "repeats": repeats}


# --------------------------------------------------------------------------------------------- evaluation

def evaluate(run_dir: str, *, cfg_scales=(3.0,), sampler: str = "ddim", steps: int = 50, n_per_class: int = 100,
             seed: int = 0, fd_repeats: int = 10, clip: bool = True, progress: bool = False,
             grid: str | None = None) -> dict:
    from fastsd.train.datasets import load_dataset
    from fastsd.train.sample import generate, load_run, make_grid

    model, run = load_run(run_dir)
    tc = run.train
    t0 = time.perf_counter()
    data = load_dataset(tc.dataset, tc.data_path, tc.image_size, tc.channels)
    if len(data.test_x) < 2 * MIN_FD_HALF:
        raise ValueError(f"the held-out split has {len(data.test_x)} image(s); the Frechet distance needs at least "
                         f"{2 * MIN_FD_HALF} (two halves of {MIN_FD_HALF}): this dataset is too small to evaluate")
    clf = FeatureClassifier(seed).fit(data.train_x, data.train_y, seed)
    real_acc = float((clf.predict(data.test_x) == data.test_y).mean())
    real_feats = clf.features(data.test_x)
    n_classes = data.num_classes
    result = {"run": os.path.abspath(run_dir), "dataset": tc.dataset, "conditional": run.num_classes > 0,
              "classifier": f"MLPClassifier(hidden_layer_sizes=({HIDDEN},)) on pixels",
              "classifier_heldout_accuracy": real_acc, "heldout_size": int(len(data.test_x)),
              "sampler": sampler, "steps": steps, "n_per_class": n_per_class, "seed": seed, "clip": clip,
              "class_names": list(data.class_names), "classifier_seconds": round(time.perf_counter() - t0, 2),
              "results": []}
    scales = cfg_scales if run.num_classes else (1.0,)
    for scale in scales:
        t1 = time.perf_counter()
        labels = [c for c in range(n_classes) for _ in range(n_per_class)] if run.num_classes else \
            [None] * (n_classes * n_per_class)
        x = generate(model, run, labels, cfg_scale=scale, sampler=sampler, steps=steps, seed=seed, clip=clip,
                     progress=progress)
        secs = time.perf_counter() - t1
        pred = clf.predict(x)
        r = {"cfg_scale": scale, "sample_seconds": round(secs, 2)}
        if run.num_classes:
            y = np.asarray(labels)
            per = [float((pred[y == c] == c).mean()) for c in range(n_classes)]
            r.update(per_class_accuracy=per, mean_accuracy=float(np.mean(per)))
        else:
            r["class_histogram"] = [float((pred == c).mean()) for c in range(n_classes)]
        r.update(fd_with_floor(real_feats, clf.features(x), fd_repeats, seed))
        result["results"].append(r)
        if grid:
            from fastsd.image import save_png

            k = min(n_per_class, 16)
            pick = torch.cat([x[c * n_per_class:c * n_per_class + k] for c in range(n_classes)]) \
                if run.num_classes else x[:n_classes * k]
            path = grid if len(scales) == 1 else "{0}-cfg{2:g}{1}".format(*os.path.splitext(grid), scale)
            save_png(make_grid(pick, k, scale=max(1, 32 // run.image_size)), path)
    return result


def markdown(result: dict) -> str:
    names = result["class_names"]
    lines = [f"Classifier ({result['classifier']}) accuracy on the real held-out split "
             f"({result['heldout_size']} images): {result['classifier_heldout_accuracy']:.1%}", ""]
    sampler = f"{result['sampler']}, {result['steps']} steps"
    if result["conditional"]:
        head = ["CFG scale", "sampler"] + [f"acc {n}" for n in names] + ["mean acc", "FD", "FD floor (real/real)",
                                                                         "FD full"]
    else:
        head = ["CFG scale", "sampler"] + [f"share {n}" for n in names] + ["FD", "FD floor (real/real)", "FD full"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["results"]:
        cells = [f"{r['cfg_scale']:g}", sampler]
        if result["conditional"]:
            cells += [f"{a:.0%}" for a in r["per_class_accuracy"]] + [f"**{r['mean_accuracy']:.1%}**"]
        else:
            cells += [f"{a:.0%}" for a in r["class_histogram"]]
        cells += [f"{r['fd']:.2f} ± {r['fd_std']:.2f}", f"{r['floor']:.2f} ± {r['floor_std']:.2f}",
                  f"{r['fd_full']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"FD: Frechet distance in the classifier's {HIDDEN}-unit hidden layer, "
              f"{result['results'][0]['half_size']} "
              f"held-out images vs as many samples (mean ± std over {result['results'][0]['repeats']} "
              f"random splits); floor: the two real halves; full: all held-out vs all samples."]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m fastsd.train.evaluate", description="Classifier accuracy and Frechet "
                       "distance of a fastsd.train run's samples.", formatter_class=HelpFormatter)
    add_run_sampling_args(p, sampler="ddim")
    p.add_argument("--cfg-scale", type=float_in(), nargs="+", default=[3.0], help="one or more guidance scales")
    p.add_argument("--n-per-class", type=int_in(2, 10000), default=100)
    p.add_argument("--fd-repeats", type=int_in(1, 1000), default=10)
    p.add_argument("--json", default=None, help="JSON output path (default: RUN/eval.json)")
    p.add_argument("--grid", default=None, help="also write a PNG grid of (up to 16 per class) evaluated samples")
    return p



def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_run_args(parser, argv)
    from fastsd.train.sample import output_problem

    why = (args.json and output_problem("--json", args.json, "")) or \
        (args.grid and output_problem("--grid", args.grid, ".png"))
    if why:
        usage_error(parser, why)  # before minutes of sampling, not a traceback after them
    from fastsd.train.datasets import DatasetError
    from fastsd.samplers import get_sampler
    from fastsd.files import atomic_write

    try:
        require("sklearn", "train")
        sampler = get_sampler(args.sampler).name
        result = evaluate(args.run, cfg_scales=tuple(args.cfg_scale), sampler=sampler, steps=args.steps,
                          n_per_class=args.n_per_class, seed=args.seed, fd_repeats=args.fd_repeats,
                          clip=not args.no_clip, progress=not args.no_progress, grid=args.grid)
    except (DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.json or os.path.join(args.run, "eval.json")
    atomic_write(out, lambda tmp: open(tmp, "w").write(json.dumps(result, indent=2)))
    print(markdown(result))
    print(f"\n(wrote {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
