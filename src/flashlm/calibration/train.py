"""Train the paper's low-rank predictor, sigmoid(B (A x) + b), per layer, with a balanced
loss (positives weighted by negatives/positives), on recorded FFN inputs and their target
sets (the neurons carrying the most magnitude). Shadow copies need no training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from flashlm.models.selectors import PredictorSelector, recall, top_mask


@dataclass(frozen=True)
class PredictorSettings:
    rank: int = 64
    steps: int = 300
    batch: int = 512
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def svd_init(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """A (r, d), B (n, r) with B A the best rank-r approximation of weight (n, d)."""
    U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
    r = min(rank, S.shape[0])
    root = S[:r].sqrt()
    return root[:, None] * Vh[:r], U[:, :r] * root[None, :]


def train_predictor(X: Tensor, target: Tensor, s: PredictorSettings, init: Tensor | None = None) -> PredictorSelector:
    """X (N, d) inputs, target (N, n) bool: which neurons must be chosen. `init` (n, d): a
    weight whose low-rank part starts the predictor (the gate rows of a gated model)."""
    g = torch.Generator().manual_seed(s.seed)
    N, d = X.shape
    n = target.shape[1]
    if init is not None:
        A0, B0 = svd_init(init, s.rank)
    else:
        A0 = torch.randn(s.rank, d, generator=g) / d**0.5
        B0 = torch.randn(n, s.rank, generator=g) / s.rank**0.5
    A = A0.clone().requires_grad_(True)
    B = B0.clone().requires_grad_(True)
    b = torch.zeros(n, requires_grad=True)
    p = target.float().mean().clamp(1e-3, 1 - 1e-3)
    pos_weight = ((1 - p) / p).expand(n)
    opt = torch.optim.Adam([A, B, b], lr=s.lr, weight_decay=s.weight_decay)
    X = X.float()
    with torch.enable_grad():
        for _ in range(s.steps):
            idx = torch.randint(0, N, (min(s.batch, N),), generator=g)
            logits = (X[idx] @ A.T) @ B.T + b
            loss = F.binary_cross_entropy_with_logits(logits, target[idx].float(), pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return PredictorSelector(A.detach(), B.detach(), b.detach())


def selection_report(scores: Tensor, exact: Tensor, density: float, threshold: float | None = None) -> dict:
    """Recall of the exact top-density set, false-negative rate and the density chosen, for a
    selector's scores (N, n) against exact magnitudes (N, n)."""
    target = top_mask(exact, density)
    chosen = top_mask(scores, density) if threshold is None else scores > threshold
    r = float(recall(chosen, target).mean())
    return {"recall": r, "false_negative_rate": 1.0 - r, "predicted_density": float(chosen.float().mean())}
