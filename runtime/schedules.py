"""Sampler maths: pure numpy on scalars. Each plan gives, per step, the step engine's scalar inputs.

The step engine computes (see export/graphs.py):
    x0     = p·x + q·guided_model_output
    x_next = a·x + b·x0 + c·x0_prev
"""

import math

import numpy as np

STEP_SCALARS = ("t", "p", "q", "a", "b", "c")


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's resolution-dependent μ: linear in the number of latent tokens (diffusers calculate_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def flow_sigmas(steps: int, shift: float = 1.0, num_train_timesteps: int = 1000,
                mu: float | None = None, sigmas: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """diffusers FlowMatchEulerDiscreteScheduler.set_timesteps(steps): (sigmas incl. final 0, timesteps).

    Static shift (mu=None) is applied as diffusers does: once to the training grid (which moves sigma_min),
    once to the inference sigmas. With mu, the exponential time shift e^mu / (e^mu + 1/σ − 1) replaces it.
    """
    n = num_train_timesteps
    if sigmas is None:
        grid = np.linspace(1, n, n, dtype=np.float32)[::-1] / n
        if mu is None:
            grid = shift * grid / (1 + (shift - 1) * grid)
        sigma_max, sigma_min = float(grid[0]), float(grid[-1])
        sigmas = np.linspace(sigma_max * n, sigma_min * n, steps) / n
    sigmas = np.asarray(sigmas).astype(np.float32)
    if mu is None:
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    else:
        sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    sigmas = sigmas.astype(np.float32)
    return np.append(sigmas, np.float32(0.0)), sigmas * n


def flow_euler_plan(steps: int, shift: float = 1.0, num_train_timesteps: int = 1000,
                    mu: float | None = None, sigmas: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Euler on a velocity model v = noise − x0: x_next = x + (σ_next − σ)·v, written in x0 form.

    x0 = x − σ·v  (p = 1, q = −σ);  x_next = (σ_next/σ)·x + (1 − σ_next/σ)·x0  (a, b; c = 0).
    """
    sigmas, timesteps = flow_sigmas(steps, shift, num_train_timesteps, mu, sigmas)
    s, s_next = sigmas[:-1].astype(np.float64), sigmas[1:].astype(np.float64)
    plan = {"t": timesteps, "p": np.ones_like(s), "q": -s, "a": s_next / s, "b": 1 - s_next / s,
            "c": np.zeros_like(s)}
    return {k: v.astype(np.float32) for k, v in plan.items()}


def vp_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                      beta_end: float = 0.02) -> np.ndarray:
    """ᾱ of the linear-β DDPM schedule (DiT, PixArt), in float32 as diffusers computes it."""
    betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float32)
    return np.cumprod(1 - betas, dtype=np.float32)


def ddim_plan(steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> dict[str, np.ndarray]:
    """diffusers DDIMScheduler, η = 0, "leading" spacing, set_alpha_to_one, ε-prediction (DiT's converted pipeline).

    x0 = (x − √(1−ᾱ_t)·ε)/√ᾱ_t;  x_prev = √ᾱ_prev·x0 + √(1−ᾱ_prev)·ε, with ε rewritten through x and x0.
    """
    ac = vp_alphas_cumprod(num_train_timesteps).astype(np.float64)
    ratio = num_train_timesteps // steps
    t = (np.arange(steps) * ratio)[::-1]
    a_t, a_prev = ac[t], np.where(t - ratio >= 0, ac[np.maximum(t - ratio, 0)], 1.0)
    a = np.sqrt(1 - a_prev) / np.sqrt(1 - a_t)
    plan = {"t": t, "p": 1 / np.sqrt(a_t), "q": -np.sqrt(1 - a_t) / np.sqrt(a_t), "a": a,
            "b": np.sqrt(a_prev) - a * np.sqrt(a_t), "c": np.zeros(steps)}
    return {k: v.astype(np.float32) for k, v in plan.items()}


def _dpm_2m(alpha: np.ndarray, sigma: np.ndarray) -> dict[str, np.ndarray]:
    """DPM-Solver++(2M), midpoint, over per-step (α_t, σ_t) incl. the final one; first order first and last.

    x_t = (σ_t/σ_s)·x − α_t(e^{−h} − 1)·(D0 + D1/2),  D0 = x0,  D1 = (x0 − x0_prev)/r,  r = h_prev/h.
    """
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # +inf at the final σ = 0
    n = len(alpha) - 1
    h = lam[1:] - lam[:-1]
    phi = -alpha[1:] * np.expm1(-h)  # −α_t(e^{−h} − 1); e^{−inf} = 0 at the last step
    b, c = phi.copy(), np.zeros(n)
    for i in range(1, n - 1):  # second order except on the first and the final step
        r = h[i - 1] / h[i]
        b[i], c[i] = phi[i] * (1 + 0.5 / r), -phi[i] * 0.5 / r
    return {"a": sigma[1:] / sigma[:-1], "b": b, "c": c}


def dpm_plan(steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> dict[str, np.ndarray]:
    """diffusers DPMSolverMultistepScheduler (dpmsolver++, order 2, linspace, final σ = 0), ε-prediction (PixArt)."""
    ac = vp_alphas_cumprod(num_train_timesteps)
    t = np.linspace(0, num_train_timesteps - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    vp_sigmas = np.sqrt((1 - ac) / ac)
    sigmas = np.append(np.interp(t, np.arange(len(vp_sigmas)), vp_sigmas), 0.0).astype(np.float32).astype(np.float64)
    alpha = 1 / np.sqrt(sigmas**2 + 1)
    sigma = sigmas * alpha
    plan = {"t": t, "p": 1 / alpha[:-1], "q": -sigma[:-1] / alpha[:-1], **_dpm_2m(alpha, sigma)}
    return {k: v.astype(np.float32) for k, v in plan.items()}


def flow_dpm_plan(steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> dict[str, np.ndarray]:
    """The same solver on flow sigmas (Sana): α_t = 1 − σ, σ_t = σ, x0 = x − σ·v; the model sees int(σ·1000)."""
    s = 1.0 - np.linspace(1, 1 / num_train_timesteps, steps + 1)
    s = np.flip(shift * s / (1 + (shift - 1) * s))[:-1]
    sig = np.append(s, 0.0).astype(np.float32).astype(np.float64)
    t = (s * num_train_timesteps).astype(np.int64)  # truncated, as diffusers casts the timesteps
    plan = {"t": t, "p": np.ones(steps), "q": -sig[:-1], **_dpm_2m(1 - sig, sig)}
    return {k: v.astype(np.float32) for k, v in plan.items()}


def flux_plan(steps: int, image_seq_len: int, num_train_timesteps: int = 1000, dynamic: bool = True,
              shift: float = 1.0) -> dict[str, np.ndarray]:
    """FluxPipeline: sigmas linspace(1, 1/n, n), exponentially time-shifted by μ(image tokens) when the scheduler
    shifts dynamically (dev), else statically shifted (schnell: shift 1, i.e. unchanged)."""
    return flow_euler_plan(steps, shift, num_train_timesteps, mu=calculate_shift(image_seq_len) if dynamic else None,
                           sigmas=np.linspace(1.0, 1 / steps, steps))


SCHEDULERS = {"flow_euler": flow_euler_plan, "ddim": ddim_plan, "dpmsolver++": dpm_plan,
              "flow_dpmsolver++": flow_dpm_plan, "flow_euler_dynamic": flux_plan, "flow_euler_linspace": flux_plan}


def make_plan(name: str, steps: int, shift: float, num_train_timesteps: int, image_seq_len: int) -> dict:
    """The per-step scalars of sampler `name` (a manifest scheduler name)."""
    if name in ("flow_euler_dynamic", "flow_euler_linspace"):
        return flux_plan(steps, image_seq_len, num_train_timesteps, name == "flow_euler_dynamic", shift)
    return SCHEDULERS[name](steps, shift, num_train_timesteps)
