"""In-loop evaluation: sample with the student (several NFEs and gammas) and the teacher, score
against held-out data, and draw what people would rather look at than read.

Metric keys follow the platform's schema: eval/{metric}/nfe{n}[/gamma{g}] and
eval/{metric}/teacher_nfe{n}. Lower is better for every metric here.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .config import TrainConfig
from .parameterization import CTMModel
from .samplers import gamma_sample, heun_nfe, heun_sample


def metric_key(metric: str, nfe: int, gamma: float = 0.0, teacher: bool = False) -> str:
    if teacher:
        return f"eval/{metric}/teacher_nfe{nfe}"
    key = f"eval/{metric}/nfe{nfe}"
    return key if gamma == 0 else f"{key}/gamma{gamma:g}"


def primary_metric(kind: str, spec: str) -> str:
    if kind == "vector":
        return "sw2"
    return "fd_digits" if spec.startswith("digits") else "fid"


@dataclass
class Evaluator:
    """Scores samples against a fixed held-out set; the same starting noise at every evaluation."""

    config: TrainConfig
    reference: Tensor                 # held-out data (n, ...)
    kind: str
    device: torch.device
    cache_dir: str | None = None
    num_classes: int = 0              # > 0: a class-conditional network, sampled at fixed uniform labels
    _scorer: Callable[[Tensor], dict[str, float]] | None = field(default=None, init=False)
    _teacher_scores: dict[str, float] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        from .data import derived_seed

        n = self.config.eval.num_samples  # not capped at the reference size: the samples' statistics need them
        gen = torch.Generator().manual_seed(derived_seed("eval-noise", self.config.seed))
        self.z = torch.randn((n, *self.reference.shape[1:]), generator=gen)
        # Uniform labels, as EDM's FID for conditional models; fixed like z so evaluations compare.
        self.labels = torch.randint(self.num_classes, (n,), generator=gen) if self.num_classes else None
        self.metric = primary_metric(self.kind, self.config.data.spec)
        self._scorer = self._build_scorer()

    def _build_scorer(self) -> Callable[[Tensor], dict[str, float]]:
        from . import metrics

        ref = self.reference
        if self.metric == "sw2":
            ref_within = metrics.within_distance(ref)  # the reference is fixed: its own term once
            return lambda x: {"sw2": metrics.sliced_wasserstein(x, ref, seed=0),
                              "energy": metrics.energy_distance(x, ref, y_within=ref_within)}
        if self.metric == "fd_digits":
            classifier = metrics.digits_classifier(self.cache_dir)
            stats = metrics.gaussian_stats(metrics.digits_features(ref, classifier))
            return lambda x: {"fd_digits": metrics.digits_fd(x.clamp(-1, 1), stats, classifier)}
        extractor = metrics.load_inception(self.config.eval.inception, self.cache_dir, self.device)
        ref_stats = metrics.inception_stats(ref, extractor, device=self.device)
        return lambda x: {"fid": metrics.frechet_distance(*metrics.inception_stats(x, extractor, device=self.device),
                                                          *ref_stats)}

    def _batched(self, fn: Callable[[Tensor, Tensor | None], Tensor], batch: int = 1000) -> Tensor:
        """fn(z, labels) over the fixed noise (and labels) in chunks, gathered on the CPU."""
        out = []
        for i in range(0, self.z.shape[0], batch):
            labels = None if self.labels is None else self.labels[i:i + batch].to(self.device)
            out.append(fn(self.z[i:i + batch].to(self.device), labels).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def student_samples(self, model: CTMModel, nfe: int, gamma: float = 0.0) -> Tensor:
        from .data import derived_seed

        gen = torch.Generator().manual_seed(derived_seed("eval-gamma", self.config.seed, nfe, gamma))
        return self._batched(lambda z, y: gamma_sample(model, z, nfe, gamma, generator=gen, class_labels=y))

    @torch.no_grad()
    def teacher_samples(self, denoiser_model: CTMModel, steps: int) -> Tensor:
        def sample(z: Tensor, labels: Tensor | None) -> Tensor:
            denoiser = lambda x, t: denoiser_model.denoiser(x, t, labels)
            return heun_sample(denoiser, z, steps, denoiser_model.process)

        return self._batched(sample)

    def evaluate(self, student: CTMModel | None, teacher: CTMModel | None) -> tuple[dict[str, float], dict[str, Tensor]]:
        """Metrics and the samples they were computed from (for pictures). The teacher's scores are
        computed once (it does not change during distillation)."""
        scores: dict[str, float] = {}
        shown: dict[str, Tensor] = {}
        with _eval_mode(student, teacher):  # no dropout while sampling
            self._evaluate_into(scores, shown, student, teacher)
        return scores, shown

    def _evaluate_into(self, scores: dict[str, float], shown: dict[str, Tensor], student: CTMModel | None,
                       teacher: CTMModel | None) -> None:
        cfg = self.config.eval
        if teacher is not None and cfg.teacher_steps:
            nfe = heun_nfe(cfg.teacher_steps)
            if self._teacher_scores is None or student is None:
                samples = self.teacher_samples(teacher, cfg.teacher_steps)
                self._teacher_scores = {metric_key(k, nfe, teacher=True): v for k, v in self._scorer(samples).items()}
                shown[f"teacher_nfe{nfe}"] = samples
            scores.update(self._teacher_scores)
        if student is not None:
            for nfe in cfg.nfe:
                for gamma in cfg.gammas:
                    if nfe == 1 and gamma > 0:
                        continue  # one step has no intermediate noise: identical to gamma 0
                    samples = self.student_samples(student, nfe, gamma)
                    scores.update({metric_key(k, nfe, gamma): v for k, v in self._scorer(samples).items()})
                    if gamma == 0:
                        shown[f"nfe{nfe}"] = samples


@contextmanager
def _eval_mode(*models: torch.nn.Module | None):
    """Put networks in eval mode for a block and restore their previous modes after it."""
    models = [m for m in models if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def save_sample_figure(samples: dict[str, Tensor], reference: Tensor, kind: str, path: Path, title: str) -> Path:
    """Scatter plots (2-D), histograms (1-D) or image grids, one panel per sampler, plus the data."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {"data": reference[: max(len(v) for v in samples.values())], **samples}
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, x) in zip(axes[0], panels.items()):
        x = x.float().cpu()
        if kind == "vector" and x.shape[1] == 1:
            ax.hist(x[:, 0].numpy(), bins=80, density=True, color="C0" if name == "data" else "C1")
        elif kind == "vector":
            ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=2, alpha=0.5, color="C0" if name == "data" else "C1")
            ax.set_aspect("equal")
        else:
            ax.imshow(_image_grid(x[:64]), cmap="gray" if x.shape[1] == 1 else None, interpolation="nearest")
            ax.axis("off")
        ax.set_title(name)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _image_grid(images: Tensor) -> "np.ndarray":
    n, c, h, w = images.shape
    cols = int(n ** 0.5 + 0.999)
    rows = (n + cols - 1) // cols
    grid = torch.ones(c, rows * (h + 1), cols * (w + 1))
    for i, img in enumerate(images.clamp(-1, 1) * 0.5 + 0.5):
        r, q = divmod(i, cols)
        grid[:, r * (h + 1):r * (h + 1) + h, q * (w + 1):q * (w + 1) + w] = img
    grid = grid.permute(1, 2, 0).numpy()
    return grid[..., 0] if c == 1 else grid
