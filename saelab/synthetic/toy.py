"""`train_toy_sae`: an SAE trained on planted features and scored against them, in one call."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from saelab.core.files import atomic_write_bytes
from saelab.saes.base import SAE
from saelab.saes.registry import create_sae
from saelab.synthetic.planted import PlantedFeatures, SyntheticSource
from saelab.synthetic.recovery import feature_recall, mcc, optimal_matching
from saelab.training.config import TrainConfig
from saelab.training.trainer import Trainer


def train_toy_sae(
    features: PlantedFeatures,
    architecture: str = "topk",
    d_sae: int | None = None,
    total_tokens: int = 500_000,
    batch_size: int = 1024,
    lr: float = 3e-3,
    seed: int = 0,
    plot: str | Path | None = None,
    **sae_options: Any,
) -> tuple[SAE, dict[str, float | None]]:
    """Train `architecture` on `features` and return it with {mcc, recall, explained_variance, l0} (the last two
    None if no step ran); `plot` saves a PNG of the true-vs-learned cosine matrix under the optimal matching."""
    torch.manual_seed(seed)
    sae = create_sae(architecture, d_in=features.d_in, d_sae=d_sae or features.n_features, **sae_options)
    config = TrainConfig(
        total_tokens=total_tokens,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        progress_bar=False,
        dead_window_tokens=min(50_000, total_tokens // 4),
    )
    trainer = Trainer(sae, config)
    trained = trainer.fit(SyntheticSource(features, batch_size, seed=seed))["sae"]
    result = {
        "mcc": mcc(trained.W_dec, features.features),
        "recall": float(feature_recall(trained.W_dec, features.features).float().mean()),
        "explained_variance": trainer.last_record.get("explained_variance"),
        "l0": trainer.last_record.get("l0"),
    }
    if plot is not None:
        plot_matching(trained, features, plot)
    return trained, result


def plot_matching(sae: SAE, features: PlantedFeatures, path: str | Path) -> Path:
    """Cosine similarity of true features (rows) with their matched decoder rows (columns, same order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = optimal_matching(sae.W_dec, features.features)
    learned = sae.W_dec.detach()[cols]
    learned = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = (features.features[rows] @ learned.T).numpy()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    image = ax.imshow(cos, cmap="RdBu_r", vmin=-1, vmax=1)
    fig.colorbar(image, ax=ax)
    ax.set_xlabel("learned latent (matched order)")
    ax.set_ylabel("true feature")
    ax.set_title(f"MCC {mcc(sae.W_dec, features.features):.3f}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
