"""Train the built-in `digits` demo: a small class-conditional DiT on scikit-learn's handwritten digits.

Rectified flow: x_σ = (1 − σ)·x0 + σ·noise, the model predicts v = noise − x0 at timestep σ·1000
(diffusers FlowMatchEulerDiscreteScheduler convention), labels dropped 10% of the time for CFG.
Seeded and CPU-only, so the same command gives the same weights:

    python -m ditrt.export.demos.train_digits --out export/demos/digits.safetensors
"""

import argparse
import copy
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..models.dit import DiT
from ..ops import lowering
from . import DIGITS_CONFIG, digits_images


def train(steps: int, batch_size: int, lr: float, seed: int, log_every: int = 500) -> tuple[DiT, dict]:
    torch.manual_seed(seed)
    cfg = DIGITS_CONFIG
    images, labels = digits_images()
    data, targets = torch.from_numpy(images), torch.from_numpy(labels)
    model = DiT(cfg).init_weights(seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 500))
    g = torch.Generator().manual_seed(seed)
    start, losses = time.perf_counter(), []
    with lowering("reference"):  # differentiable plain-torch ops
        for step in range(steps):
            idx = torch.randint(0, len(data), (batch_size,), generator=g)
            x0, y = data[idx], targets[idx].clone()
            y[torch.rand(batch_size, generator=g) < 0.1] = cfg.num_classes  # null class for CFG
            noise = torch.randn(x0.shape, generator=g)
            sigma = torch.rand(batch_size, generator=g)
            xt = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
            loss = F.mse_loss(model(xt, sigma * 1000, y), noise - x0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - 0.999)
            losses.append(loss.item())
            if (step + 1) % log_every == 0:
                print(
                    f"step {step + 1}/{steps}  loss {np.mean(losses[-log_every:]):.4f}  "
                    f"{time.perf_counter() - start:.0f}s",
                    flush=True,
                )
    info = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "ema": 0.999,
        "final_loss": float(np.mean(losses[-log_every:])),
        "seconds": round(time.perf_counter() - start),
    }
    return ema, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the .safetensors weights")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    from safetensors.torch import save_file

    model, info = train(args.steps, args.batch_size, args.lr, args.seed)
    # fp16 storage keeps the shipped file small; the model runs in fp32.
    tensors = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, args.out, metadata={"training": json.dumps(info)})
    print(json.dumps(info))


if __name__ == "__main__":
    main()
