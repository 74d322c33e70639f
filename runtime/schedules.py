"""Sampler maths: pure numpy on scalars. Each plan gives, per step, the step engine's scalar inputs.

The step engine computes (see export/graphs.py):
    x0     = p·x + q·guided_model_output
    x_next = a·x + b·x0 + c·x0_prev
"""

import math

import numpy as np

STEP_SCALARS = ("t", "p", "q", "a", "b", "c")


def flow_sigmas(steps: int, shift: float = 1.0, num_train_timesteps: int = 1000,
                mu: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """diffusers FlowMatchEulerDiscreteScheduler.set_timesteps(steps): (sigmas incl. final 0, timesteps).

    Static shift (mu=None) is applied as diffusers does: once to the training grid (which moves sigma_min),
    once to the inference sigmas. With mu, the exponential time shift e^mu / (e^mu + 1/σ − 1) replaces it.
    """
    n = num_train_timesteps
    grid = np.linspace(1, n, n, dtype=np.float32)[::-1] / n
    if mu is None:
        grid = shift * grid / (1 + (shift - 1) * grid)
    sigma_max, sigma_min = float(grid[0]), float(grid[-1])
    sigmas = (np.linspace(sigma_max * n, sigma_min * n, steps) / n).astype(np.float32)
    if mu is None:
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    else:
        sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    sigmas = sigmas.astype(np.float32)
    return np.append(sigmas, np.float32(0.0)), sigmas * n


def flow_euler_plan(steps: int, shift: float = 1.0, num_train_timesteps: int = 1000,
                    mu: float | None = None) -> dict[str, np.ndarray]:
    """Euler on a velocity model v = noise − x0: x_next = x + (σ_next − σ)·v, written in x0 form.

    x0 = x − σ·v  (p = 1, q = −σ);  x_next = (σ_next/σ)·x + (1 − σ_next/σ)·x0  (a, b; c = 0).
    """
    sigmas, timesteps = flow_sigmas(steps, shift, num_train_timesteps, mu)
    s, s_next = sigmas[:-1].astype(np.float64), sigmas[1:].astype(np.float64)
    plan = {"t": timesteps, "p": np.ones_like(s), "q": -s, "a": s_next / s, "b": 1 - s_next / s,
            "c": np.zeros_like(s)}
    return {k: v.astype(np.float32) for k, v in plan.items()}


SCHEDULERS = {"flow_euler": flow_euler_plan}
