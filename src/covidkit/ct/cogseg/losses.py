"""CogSeg losses: region mutual information (RMI), edge-guided RMI and the combined CogSeg loss.

RMI: S. Zhao, Y. Wang, Z. Yang, D. Cai, "Region Mutual Information Loss for Semantic Segmentation",
NeurIPS 2019; reference implementation ``ZJULearning/RMI`` (``losses/rmi/rmi.py``, sigmoid path). This is an
independent implementation that reproduces the reference's numbers: each pixel and its R x R neighbourhood form
a point in R^(R*R) for the labels and for the predicted probabilities; RMI is the log-determinant of the
posterior covariance of the label points given the prediction points, a lower bound of their mutual
information up to constants.

Edge-guided RMI and the CogSeg loss: Sang et al., "Super-resolution and infection edge-guided co-learning for
COVID-19 CT segmentation", ICASSP 2021, Eq. (3): an RMI term with R = 3 over the whole image plus an RMI term
with R = 5 over windows centred on infection edges, the edges being the boundary pixels of the predicted mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PROB_EPS = 1e-6  # added to the sigmoid probabilities, as the reference does
POS_ALPHA = 5e-4  # added to covariance diagonals so that they are positive definite
IGNORE_INDEX = 255
POOLS = ("max", "avg", "none")


def valid_one_hot(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, H, W]`` long labels -> one-hot ``[N, C, H, W]`` float (zero on ignored pixels) and valid mask ``[N, H, W]``."""
    valid = labels < num_classes
    one_hot = F.one_hot(labels * valid, num_classes).permute(0, 3, 1, 2).float()
    return one_hot * valid.unsqueeze(1), valid.float()


def pool_maps(x: torch.Tensor, pool: str, size: int) -> torch.Tensor:
    """Downsample ``x`` by ``size`` (stride = kernel = ``size``, padding ``size // 2``) as the reference does."""
    if pool == "none" or size <= 1:
        return x
    if pool == "max":
        return F.max_pool2d(x, kernel_size=size, stride=size, padding=size // 2)
    return F.avg_pool2d(x, kernel_size=size, stride=size, padding=size // 2)


def region_vectors(maps: torch.Tensor, radius: int) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, C, R*R, (H-R+1)*(W-R+1)]``: the R x R neighbourhood of every valid position.

    No padding; the shifts run y outer, x inner (the dimension order only permutes the covariance, but it is
    kept as in the reference).
    """
    n, c, h, w = maps.shape
    out_h, out_w = h - radius + 1, w - radius + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"maps of {h}x{w} are smaller than the RMI radius {radius}")
    shifted = [maps[:, :, y:y + out_h, x:x + out_w] for y in range(radius) for x in range(radius)]
    return torch.stack(shifted, dim=2).reshape(n, c, radius * radius, out_h * out_w)


def rmi_lower_bound(label_vecs: torch.Tensor, prob_vecs: torch.Tensor,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """Half the log-determinant of the posterior covariance of labels given probabilities, per batch item.

    ``label_vecs`` and ``prob_vecs``: ``[..., D, L]`` (D = R*R dimensions, L points). ``weights``: ``[..., L]``
    of 0/1 selecting the points (all when None). Computed in float64; the covariances are not divided by the
    number of points (as in the reference, against underflow). Returns ``[...]``.
    """
    la = label_vecs.double()
    pr = prob_vecs.double()
    if weights is None:
        la = la - la.mean(dim=-1, keepdim=True)
        pr = pr - pr.mean(dim=-1, keepdim=True)
    else:
        w = weights.double().unsqueeze(-2)
        count = w.sum(dim=-1, keepdim=True).clamp_min(1.0)
        la = (la - (la * w).sum(-1, keepdim=True) / count) * w
        pr = (pr - (pr * w).sum(-1, keepdim=True) / count) * w
    eye = torch.eye(la.shape[-2], dtype=la.dtype, device=la.device)
    la_cov = la @ la.transpose(-2, -1)
    pr_cov = pr @ pr.transpose(-2, -1)
    la_pr_cov = la @ pr.transpose(-2, -1)
    pr_cov_inv = torch.linalg.inv(pr_cov + POS_ALPHA * eye)
    posterior = la_cov - la_pr_cov @ pr_cov_inv @ la_pr_cov.transpose(-2, -1)
    chol = torch.linalg.cholesky(posterior + POS_ALPHA * eye)
    return torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # 0.5 * logdet = sum(log(diag(L)))


class RMILoss(nn.Module):
    """Region mutual information loss, sigmoid variant: ``bce_weight * BCE + (1 - bce_weight) * RMI``.

    Called on logits ``[N, C, H, W]`` and long labels ``[N, H, W]`` (``255`` = ignored); returns the total.
    ``last_parts`` keeps the two parts of the last call (detached) for logging and tests.
    """

    def __init__(self, num_classes: int, radius: int = 3, pool: str = "max", pool_size: int = 3,
                 bce_weight: float = 0.5):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if radius < 1:
            raise ValueError(f"radius must be >= 1, got {radius}")
        self.num_classes = num_classes
        self.radius = radius
        self.pool = pool
        self.pool_size = pool_size
        self.bce_weight = bce_weight
        self.last_parts: dict[str, float] = {}

    def bce(self, logits: torch.Tensor, one_hot: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Sigmoid BCE summed over valid pixels and classes, divided by (valid pixels + 1)."""
        per_pixel = F.binary_cross_entropy_with_logits(logits, one_hot, reduction="none")
        return (per_pixel * valid.unsqueeze(1)).sum() / (valid.sum() + 1.0)

    def rmi(self, logits: torch.Tensor, one_hot: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The RMI term: mean over the batch of the lower bound, divided by R^2, summed over classes."""
        probs = torch.sigmoid(logits.float()) * valid.unsqueeze(1) + PROB_EPS
        labels = pool_maps(one_hot, self.pool, self.pool_size)
        probs = pool_maps(probs, self.pool, self.pool_size)
        with torch.autocast(logits.device.type, enabled=False):  # the log-determinants need float64
            bound = rmi_lower_bound(region_vectors(labels, self.radius), region_vectors(probs, self.radius))
        return (bound.mean(dim=0) / self.radius ** 2).sum().float()

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        one_hot, valid = valid_one_hot(labels.long(), self.num_classes)
        bce = self.bce(logits, one_hot, valid)
        rmi = self.rmi(logits, one_hot, valid)
        self.last_parts = {"bce": bce.item(), "rmi": rmi.item()}
        return self.bce_weight * bce + (1.0 - self.bce_weight) * rmi


def predicted_edges(logits: torch.Tensor) -> torch.Tensor:
    """Boundary pixels of the predicted mask: ``[N, H, W]`` bool, true where a 3x3 neighbour has another class."""
    pred = logits.argmax(dim=1, keepdim=True).float()
    padded = F.pad(pred, (1, 1, 1, 1), mode="replicate")
    high = F.max_pool2d(padded, 3, stride=1)
    low = -F.max_pool2d(-padded, 3, stride=1)
    return (high != low).squeeze(1)


def window_vectors(maps: torch.Tensor, centres: torch.Tensor, radius: int) -> torch.Tensor:
    """The R x R windows of ``maps [C, H, W]`` centred on ``centres [E, 2]`` (y, x) -> ``[C, R*R, E]``."""
    half = radius // 2
    offsets = [(dy, dx) for dy in range(-half, radius - half) for dx in range(-half, radius - half)]
    ys, xs = centres[:, 0], centres[:, 1]
    return torch.stack([maps[:, ys + dy, xs + dx] for dy, dx in offsets], dim=1)


class EdgeGuidedRMILoss(nn.Module):
    """Edge-guided RMI (CogSeg Eq. 3): RMI (R = 3) over the image + RMI (R = 5) over windows on predicted edges.

    The whole-image term is :class:`RMILoss` (BCE + RMI, pooled as configured). The edge term is the RMI lower
    bound of the R_e x R_e windows centred on the boundary pixels of the predicted mask (argmax), at full
    resolution without pooling (pooling would blur the very boundaries the term is about); the paper does not
    say, so this is our choice. Its covariances run over the edge windows of each slice; slices with fewer than
    ``2 * R_e^2`` edge pixels (too few points for a covariance) are left out; at most ``max_edge_pixels`` per
    slice are used (evenly strided), which bounds the memory early in training when predictions are noisy.
    """

    def __init__(self, num_classes: int, radius: int = 3, edge_radius: int = 5, pool: str = "max",
                 pool_size: int = 3, bce_weight: float = 0.5, max_edge_pixels: int = 8192):
        super().__init__()
        self.num_classes = num_classes
        self.edge_radius = edge_radius
        self.max_edge_pixels = max_edge_pixels
        self.region = RMILoss(num_classes, radius, pool, pool_size, bce_weight)
        self.last_parts: dict[str, float] = {}

    def edge_centres(self, edges: torch.Tensor) -> torch.Tensor:
        """``[H, W]`` bool -> ``[E, 2]`` (y, x) of edge pixels whose window lies inside the image, capped."""
        half = self.edge_radius // 2
        h, w = edges.shape
        inner = torch.zeros_like(edges)
        inner[half:h - (self.edge_radius - half) + 1, half:w - (self.edge_radius - half) + 1] = True
        centres = torch.nonzero(edges & inner)
        if len(centres) > self.max_edge_pixels:
            step = -(-len(centres) // self.max_edge_pixels)
            centres = centres[::step]
        return centres

    def edge_rmi(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        one_hot, valid = valid_one_hot(labels.long(), self.num_classes)
        probs = torch.sigmoid(logits.float()) * valid.unsqueeze(1) + PROB_EPS
        edges = predicted_edges(logits.detach()) & (valid > 0)
        terms = []
        for i in range(len(logits)):
            centres = self.edge_centres(edges[i])
            if len(centres) < 2 * self.edge_radius ** 2:
                continue
            la = window_vectors(one_hot[i], centres, self.edge_radius)
            pr = window_vectors(probs[i], centres, self.edge_radius)
            with torch.autocast(logits.device.type, enabled=False):
                terms.append(rmi_lower_bound(la, pr) / self.edge_radius ** 2)
        if not terms:
            return logits.new_zeros(())
        return torch.stack(terms).mean(dim=0).sum().float()

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        region = self.region(logits, labels)
        edge = self.edge_rmi(logits, labels)
        self.last_parts = {**self.region.last_parts, "edge_rmi": edge.item()}
        return region + edge


@dataclass
class CogSegLossConfig:
    """Weights and switches of the CogSeg loss (defaults: the full method of the paper).

    ``feature_scales``: how many decoder scales get an L1 loss between the segmentation and SR decoder
    features (0, 1 = the finest, or 4); ``rmi``: ``"none"``, ``"rmi"`` (R = 3) or ``"edge"`` (edge-guided).
    """

    ce_weight: float = 1.0
    sr_weight: float = 0.5
    feature_weight: float = 0.5
    rmi_weight: float = 0.5
    sr: bool = True
    feature_scales: int = 4
    rmi: str = "edge"
    rmi_pool: str = "max"
    rmi_pool_size: int = 3


class CogSegLoss(nn.Module):
    """``ce * CE + sr * MSE(SR, image) + feature * sum_k L1(seg_k, sr_k) + rmi * (edge-guided) RMI``.

    ``class_weights`` (one per class, optional) weight the cross-entropy's pixels by their true class.

    Called on the model's output dict (``seg`` logits, and when the SR branch ran ``sr``, ``seg_features``,
    ``sr_features``), the long mask ``[N, H, W]`` and the full-resolution image ``[N, 1, H, W]``. Returns the
    total; ``last_parts`` holds the weighted parts of the last call.
    """

    def __init__(self, num_classes: int, cfg: CogSegLossConfig | None = None,
                 class_weights: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg = cfg or CogSegLossConfig()
        self.class_weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        if cfg.rmi not in ("none", "rmi", "edge"):
            raise ValueError(f"rmi must be 'none', 'rmi' or 'edge', got {cfg.rmi!r}")
        if cfg.feature_scales and not cfg.sr:
            raise ValueError("feature L1 losses need the SR branch (sr=True)")
        self.rmi_loss: nn.Module | None = None
        if cfg.rmi == "rmi":
            self.rmi_loss = RMILoss(num_classes, 3, cfg.rmi_pool, cfg.rmi_pool_size)
        elif cfg.rmi == "edge":
            self.rmi_loss = EdgeGuidedRMILoss(num_classes, 3, 5, cfg.rmi_pool, cfg.rmi_pool_size)
        self.last_parts: dict[str, float] = {}

    def forward(self, outputs: dict, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        logits = outputs["seg"].float()
        weight = None if self.class_weights is None else self.class_weights.to(logits.device)
        parts = {"ce": cfg.ce_weight * F.cross_entropy(logits, mask, weight=weight, ignore_index=IGNORE_INDEX)}
        if cfg.sr:
            if outputs.get("sr") is None:
                raise ValueError("the loss needs the SR output: run the model with the SR branch")
            parts["sr"] = cfg.sr_weight * F.mse_loss(outputs["sr"].float(), image)
            pairs = list(zip(outputs["seg_features"], outputs["sr_features"]))[::-1][:cfg.feature_scales]
            if pairs:
                parts["feature_l1"] = cfg.feature_weight * sum(F.l1_loss(a.float(), b.float()) for a, b in pairs)
        if self.rmi_loss is not None:
            parts["rmi"] = cfg.rmi_weight * self.rmi_loss(logits, mask)
        self.last_parts = {k: v.item() for k, v in parts.items()}
        return sum(parts.values())
