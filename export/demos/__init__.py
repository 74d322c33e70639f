"""Built-in demo models: trained weights shipped in this package, so a fresh machine needs no download."""

from pathlib import Path

import numpy as np

from ..models.dit import DiTConfig

HERE = Path(__file__).parent

# 8×8 scikit-learn digits upsampled to 16×16, one channel in [-1, 1], modelled directly in pixel space.
DIGITS_CONFIG = DiTConfig(
    sample_size=16,
    in_channels=1,
    patch_size=4,
    hidden_size=128,
    depth=4,
    num_heads=4,
    num_classes=10,
    learn_sigma=False,
    prediction="flow",
)
DIGITS_WEIGHTS = HERE / "digits.safetensors"
# The text-to-image demo is a diffusers SanaPipeline folder (see train_text_digits.py).
TEXT_DIGITS_FOLDER = HERE / "text_digits"


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as (N, 1, 16, 16) float32 in [-1, 1] and (N,) int64 labels."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    return (x * 2 - 1).numpy(), d.target.astype(np.int64)
