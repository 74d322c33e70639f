"""diffusers schedulers as pure numpy on scalars: a scheduler config in, the step engine's per-step scalars out.

The step engine (export/graphs.py) computes, from the guided model output g:
    x0     = clamp(p·x + q·g, −clip, clip)
    x_next = a·x + b·x0 + c·x0_prev + e·x0_prev2 + d·g
Every supported scheduler is this form with host-side coefficients, so the loop stays one engine call per step.
A config is the folder's `scheduler_config.json`: `_class_name` plus every option. Options that change the
numbers are reproduced as diffusers computes them, or refused by `check_config` naming the option. Each
supported class is one `SchedulerKind` in the registry, `SCHEDULERS`, keyed by its diffusers class name.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

STEP_SCALARS = ("t", "p", "q", "a", "b", "c", "e", "d", "clip")

_WHY = {
    "thresholding": "dynamic thresholding needs a per-sample quantile",
    "stochastic_sampling": "it draws noise every step",
    "algorithm_type": "SDE and ε-space variants are not implemented",
    "use_beta_sigmas": "it needs scipy",
    "use_lu_lambdas": "not implemented",
    "invert_sigmas": "only Mochi uses it",
    "variance_type": "diffusers slices 3 channels, which fails for these models",
}


def prediction_of(config: dict) -> str:
    """What the model predicts under this scheduler: "flow" (v = noise − x0), "epsilon", "v_prediction", "sample"."""
    prediction = config.get("prediction_type", "flow")  # FlowMatch classes have no prediction_type: flow
    return "flow" if prediction == "flow_prediction" else prediction


def full_config(config: dict) -> dict:
    """The config with the class's defaults filled in, as diffusers' `from_config` registers it: every option,
    and in "_use_default_values" the ones the folder left out (which switching to another class does not carry)."""
    if not isinstance(config, dict):
        raise ConfigError(f"a scheduler config must be a JSON object, got {type(config).__name__}")
    cls = config.get("_class_name")
    if not isinstance(cls, str) or cls not in SCHEDULERS:
        raise ConfigError(f"scheduler class {cls!r} is not supported; supported: {', '.join(SCHEDULERS)}")
    defaults = SCHEDULERS[cls].defaults
    defaulted = config.get("_use_default_values", [])
    if not isinstance(defaulted, list):
        raise ConfigError(f"scheduler config _use_default_values must be a list, got {defaulted!r}")
    given = {k: v for k, v in config.items() if k in defaults and k not in defaulted}
    out = {
        "_class_name": cls,
        **defaults,
        **given,
        "_use_default_values": sorted(k for k in defaults if k not in given),
    }
    for key, default in defaults.items():
        _check_type(cls, key, out[key], default)
    return out


def given_options(config: dict) -> dict:
    """The options a config sets itself (what `X.from_config(config)` carries over to another class)."""
    defaulted = config.get("_use_default_values", [])
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in defaulted}


_POSITIVE = (
    "shift",
    "flow_shift",
    "clip_sample_range",
    "num_train_timesteps",
    "solver_order",
    "base_image_seq_len",
    "max_image_seq_len",
)


def _check_type(cls: str, key: str, value, default) -> None:
    """An option's value has its default's type (numbers finite; shifts, lengths, ranges positive)."""

    def real(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    elif isinstance(default, float):
        ok = real(value) and (math.isfinite(value) or key == "lambda_min_clipped") and not math.isnan(value)
    elif key == "trained_betas":
        ok = value is None or (isinstance(value, list) and all(real(b) and 0 <= b < 1 for b in value))
    elif default is None and key != "variance_type":  # shift_terminal, sigma_min, sigma_max
        ok = value is None or (real(value) and math.isfinite(value) and value > 0)
    else:
        ok = True  # strings and None-or-string options are checked against the supported values
    if ok and key in _POSITIVE:
        ok = value > 0
    if not ok:
        expected = (
            "true or false"
            if isinstance(default, bool)
            else f"an integer {'> 0' if key in _POSITIVE else '>= 0'}"
            if isinstance(default, int)
            else f"a {'positive' if key in _POSITIVE else 'finite'} number"
            if isinstance(default, float)
            else "a list of betas in [0, 1), or null"
            if key == "trained_betas"
            else "a number > 0, or null"
        )
        raise ConfigError(f"{cls} option {key}={value!r} is not allowed; expected {expected}")


def check_config(config: dict, call: dict | None = None) -> dict:
    """The full config if this runtime reproduces it exactly (for a pipeline that calls set_timesteps as `call`
    says; call None: the pipeline is not known yet, only the class and options are checked), else ConfigError
    naming the class/option and what is supported."""
    config = full_config(config)
    cls = config["_class_name"]
    kind = SCHEDULERS[cls]
    for key, allowed in kind.allowed.items():
        if config[key] not in allowed:
            why = f" ({_WHY[key]})" if key in _WHY else ""
            raise ConfigError(
                f"{cls} option {key}={config[key]!r} is not supported{why}; supported: "
                f"{', '.join(map(repr, allowed))}"
            )
    if (
        sum(bool(config.get(k)) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"))
        > 1
    ):
        raise ConfigError(
            f"{cls}: only one of use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas may be set"
        )
    if (
        config.get("trained_betas") is not None
        and len(config["trained_betas"]) != config["num_train_timesteps"]
    ):
        raise ConfigError(
            f"{cls}: trained_betas has {len(config['trained_betas'])} values, num_train_timesteps "
            f"is {config['num_train_timesteps']}"
        )
    if not isinstance(config["num_train_timesteps"], int) or config["num_train_timesteps"] < 1:
        raise ConfigError(
            f"{cls}: num_train_timesteps {config['num_train_timesteps']!r} must be a positive integer"
        )
    if call is None:
        return config
    call = _checked_call(call)
    if kind is FLOW and config["use_dynamic_shifting"] and call.get("mu") not in ("always", "dynamic"):
        raise ConfigError(
            "FlowMatchEulerDiscreteScheduler option use_dynamic_shifting=True needs the resolution "
            "shift (mu), which this pipeline does not pass to set_timesteps (diffusers raises too); "
            "use a static shift"
        )
    if (
        kind is DPM
        and config["use_flow_sigmas"]
        and (config["use_karras_sigmas"] or config["use_exponential_sigmas"])
    ):
        raise ConfigError(
            "DPMSolverMultistepScheduler: use_karras_sigmas / use_exponential_sigmas with "
            "use_flow_sigmas give NaN in diffusers (VP sigmas with flow alphas); use one of them"
        )
    if kind in (DDIM, EULER) and (call.get("custom_sigmas") or call.get("mu") == "always"):
        raise ConfigError(
            f"this pipeline passes its own sigmas and a resolution shift (mu) to set_timesteps, which "
            f"{cls} does not accept (diffusers raises too); use FlowMatchEulerDiscreteScheduler"
        )
    if kind is EULER and call.get("steps_scaled_input"):
        raise ConfigError(
            "EulerDiscreteScheduler does not work in this pipeline: DiTPipeline passes the "
            "scale_model_input result back to scheduler.step, which breaks σ-space schedulers; use "
            "DDIMScheduler or DPMSolverMultistepScheduler"
        )
    if kind is DPM and call.get("custom_sigmas") and not config["use_flow_sigmas"]:
        raise ConfigError(
            "this pipeline passes its own sigmas to set_timesteps, which DPMSolverMultistepScheduler "
            "does not accept (diffusers raises too); use FlowMatchEulerDiscreteScheduler"
        )
    if kind is DPM and call.get("mu") == "always" and not config["use_dynamic_shifting"]:
        raise ConfigError(
            "this pipeline passes a resolution shift (mu) to set_timesteps; DPMSolverMultistepScheduler "
            "accepts it only with use_dynamic_shifting=True (diffusers asserts)"
        )
    return config


_CALL = {
    "custom_sigmas": lambda v: v in (None, "linspace"),
    "mu": lambda v: v in (None, "always", "dynamic"),
    "image_seq_len": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
    "mu_defaults": lambda v: (
        isinstance(v, list)
        and len(v) == 4
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
    ),
    "scales_initial_noise": lambda v: isinstance(v, bool),
    "one_step_x0": lambda v: isinstance(v, bool),
    "steps_scaled_input": lambda v: isinstance(v, bool),
}


def _checked_call(call) -> dict:
    """How the pipeline calls the scheduler (see timestep_args), as the manifest carries it: known keys, sane values."""
    if call is None:
        return {}
    if not isinstance(call, dict):
        raise ConfigError(f"the scheduler's pipeline call must be a JSON object, got {call!r}")
    for key, value in call.items():
        if key not in _CALL or not _CALL[key](value):
            raise ConfigError(
                f"scheduler call option {key}={value!r} is not allowed; known: {', '.join(_CALL)}"
            )
    if call.get("mu") and "image_seq_len" not in call:
        raise ConfigError("scheduler call passes mu but names no image_seq_len")
    return call


def switch(config: dict, name: str, prediction: str, shift: float | None = None) -> dict:
    """`--sampler NAME` [--shift]: the config diffusers gets from `X.from_config(config, **options)`, with the
    options that keep the model's prediction type (and, between flow schedulers, its shift) as `options`."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    kind, options = SAMPLERS[name]
    if name == "euler" and prediction != "flow":
        kind = EULER
    cls = kind.cls
    old = SCHEDULERS[config["_class_name"]]
    if prediction == "flow":
        if kind.flow_options is None:
            raise ConfigError(
                f"sampler {name!r} ({cls}) needs an epsilon/v-prediction model; this model "
                f"predicts flow; choose euler or a dpm++ sampler"
            )
        if kind.flow_options or kind is not old:  # FlowMatch to FlowMatch carries its shift itself
            options = {**kind.flow_options, kind.shift_key: config.get(old.shift_key), **options}
    else:
        if "prediction_type" not in kind.defaults:
            raise ConfigError(
                f"sampler {name!r} ({cls}) needs a flow model; this model "
                f"predicts {prediction}; choose ddim or a dpm++ sampler"
            )
        options = {"prediction_type": prediction, **options}
    new = full_config({**given_options(config), "_class_name": cls, **options})
    if shift is not None:
        key = kind.shift_key if kind is FLOW or new.get("use_flow_sigmas") else None
        if key is None or new.get("use_dynamic_shifting"):
            raise ConfigError(
                f"--shift {shift} does not apply to this sampler ({cls} without a static flow shift)"
            )
        if isinstance(shift, bool) or not (
            isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0
        ):
            raise ConfigError(f"shift {shift!r} is not allowed; use a finite number > 0")
        new = full_config({**given_options(new), "_class_name": cls, key: float(shift)})
    return new


def label(config: dict) -> str:
    """The sampler's name as A1111-style PNG metadata shows it."""
    sigmas = (
        " Karras"
        if config.get("use_karras_sigmas")
        else " Exponential"
        if config.get("use_exponential_sigmas")
        else ""
    )
    order = {1: "1S", 2: "2M", 3: "3M"}.get(config.get("solver_order"))
    return SCHEDULERS[config["_class_name"]].label.format(order=order, sigmas=sigmas)


# ---------------------------------------------------------------------------------------------- β schedules


def alphas_cumprod(c: dict) -> np.ndarray:
    """ᾱ_t in float32, as diffusers' DDPM-family schedulers compute it (linear, scaled_linear, cosine, trained)."""
    n = c["num_train_timesteps"]
    if c["trained_betas"] is not None:
        betas = np.asarray(c["trained_betas"], dtype=np.float32)
    elif c["beta_schedule"] == "linear":
        betas = _linspace32(c["beta_start"], c["beta_end"], n)
    elif c["beta_schedule"] == "scaled_linear":
        betas = _linspace32(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, n) ** 2
    else:  # squaredcos_cap_v2: betas_for_alpha_bar, cosine

        def bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array([min(1 - bar((i + 1) / n) / bar(i / n), 0.999) for i in range(n)], dtype=np.float32)
    if c["rescale_betas_zero_snr"]:
        betas = _rescale_zero_terminal_snr(betas)
    return np.cumprod((1 - betas).astype(np.float64)).astype(np.float32)  # torch accumulates in double


def _linspace32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32) bit for bit: a float32 step, fused multiply-adds from each end."""
    a, b = np.float32(start), np.float32(end)
    step = np.float64(np.float32((b - a) / np.float32(max(n - 1, 1))))
    i = np.arange(n)
    return np.where(i < n // 2, step * i + np.float64(a), np.float64(b) - step * (n - 1 - i)).astype(
        np.float32
    )


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1, in float32 as diffusers' rescale_zero_terminal_snr."""
    s = np.sqrt(np.cumprod((1 - betas).astype(np.float64)).astype(np.float32))
    s0, sT = s[0], s[-1]
    s = (s - sT) * (s0 / (s0 - sT))
    bar = s**2
    alphas = np.concatenate([bar[:1], bar[1:] / bar[:-1]])
    return (1 - alphas).astype(np.float32)


def _karras(sigma_max: float, sigma_min: float, n: int) -> np.ndarray:
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / 7.0), sigma_max ** (1 / 7.0)
    return (hi + ramp * (lo - hi)) ** 7.0


def _exponential(sigma_max: float, sigma_min: float, n: int) -> np.ndarray:
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


# --------------------------------------------------------------------------------------------- flow matching


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The pipelines' resolution-dependent μ: linear in the number of image tokens (diffusers calculate_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def flow_sigmas(c: dict, steps: int, sigmas=None, mu: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """FlowMatchEulerDiscreteScheduler.set_timesteps -> (sigmas incl. the final 0, timesteps), float32."""
    n = c["num_train_timesteps"]
    if sigmas is None:
        grid = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)  # the training grid, as __init__
        if not c["use_dynamic_shifting"]:
            grid = c["shift"] * grid / (1 + (c["shift"] - 1) * grid)
        sigmas = np.linspace(float(grid[0]) * n, float(grid[-1]) * n, steps) / n
    else:
        sigmas = np.asarray(sigmas).astype(np.float32)
    if c["use_dynamic_shifting"]:
        if mu is None:
            raise ConfigError(
                "use_dynamic_shifting needs mu (the pipeline's resolution shift); none was given"
            )
        if c["time_shift_type"] == "exponential":
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        else:
            sigmas = mu / (mu + (1 / sigmas - 1))
    else:
        sigmas = c["shift"] * sigmas / (1 + (c["shift"] - 1) * sigmas)
    if c["shift_terminal"]:
        one_minus = 1 - np.asarray(sigmas)
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - c["shift_terminal"]))
    if c["use_karras_sigmas"]:
        sigmas = _karras(float(sigmas[0]), float(sigmas[-1]), steps)
    elif c["use_exponential_sigmas"]:
        sigmas = _exponential(float(sigmas[0]), float(sigmas[-1]), steps)
    sigmas = np.asarray(sigmas).astype(np.float32)
    return np.append(sigmas, np.float32(0.0)), sigmas * np.float32(n)


def _flow_euler(c: dict, steps: int, sigmas=None, mu=None, **_) -> dict:
    """x_next = x + (σ_next − σ)·v; x0 = x − σ·v for previews and x0_prev."""
    s, t = flow_sigmas(c, steps, sigmas, mu)
    s = s.astype(np.float64)
    return {"t": t, "p": np.ones(steps), "q": -s[:-1], "a": np.ones(steps), "d": s[1:] - s[:-1]}


# ------------------------------------------------------------------------------------------------------ DDIM


def ddim_timesteps(c: dict, steps: int) -> np.ndarray:
    n = c["num_train_timesteps"]
    if c["timestep_spacing"] == "linspace":
        return np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
    if c["timestep_spacing"] == "leading":
        return (np.arange(steps) * (n // steps)).round()[::-1].astype(np.int64) + c["steps_offset"]
    return np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1  # trailing


def _ddim(c: dict, steps: int, **_) -> dict:
    """DDIMScheduler.step, η = 0: x_prev = √ᾱ_prev·clip(x0) + √(1−ᾱ_prev)·ε with ε from x and g (unclipped)."""
    ac = alphas_cumprod(c).astype(np.float64)
    final = 1.0 if c["set_alpha_to_one"] else float(ac[0])
    if steps > c["num_train_timesteps"]:
        raise ConfigError(
            f"DDIMScheduler cannot take {steps} steps: more than num_train_timesteps="
            f"{c['num_train_timesteps']} (diffusers refuses too)"
        )
    t = ddim_timesteps(c, steps)
    if t.max() >= c["num_train_timesteps"] or t.min() < 0:
        raise ConfigError(
            f"DDIMScheduler with steps_offset={c['steps_offset']} at {steps} steps reaches timestep "
            f"{t.max()}, outside 0..{c['num_train_timesteps'] - 1} (diffusers fails too); use fewer "
            "steps or a smaller steps_offset"
        )
    prev = t - c["num_train_timesteps"] // steps  # diffusers steps back by n // steps whatever the spacing
    a_t, a_prev = ac[t], np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
    al, be, dir_ = np.sqrt(a_t), np.sqrt(1 - a_t), np.sqrt(1 - a_prev)
    zero = np.zeros(steps)
    if c["prediction_type"] == "epsilon":  # x0 = (x − √β·g)/√ᾱ, ε = g
        p, q, a, d = 1 / al, -be / al, zero, dir_
    elif c["prediction_type"] == "v_prediction":  # x0 = √ᾱ·x − √β·g, ε = √ᾱ·g + √β·x
        p, q, a, d = al, -be, dir_ * be, dir_ * al
    else:  # sample: x0 = g, ε = (x − √ᾱ·g)/√β
        p, q, a, d = zero, np.ones(steps), dir_ / be, -dir_ * al / be
    clip = c["clip_sample_range"] if c["clip_sample"] else math.inf
    return {"t": t, "p": p, "q": q, "a": a, "b": np.sqrt(a_prev), "d": d, "clip": np.full(steps, clip)}


# ----------------------------------------------------------------------------------------- DPM-Solver++ (multistep)


def dpm_sigmas(c: dict, steps: int, mu: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """DPMSolverMultistepScheduler.set_timesteps -> (sigmas incl. the final one, float32; int timesteps)."""
    n = c["num_train_timesteps"]
    ac = alphas_cumprod(c)
    if c["rescale_betas_zero_snr"]:
        ac[-1] = 2.0**-24
    flow_shift = math.exp(mu) if mu is not None else c["flow_shift"]
    lam = np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))
    last = n - int(np.searchsorted(lam[::-1], c["lambda_min_clipped"]))
    if c["timestep_spacing"] == "linspace":
        t = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    elif c["timestep_spacing"] == "leading":
        t = (np.arange(steps + 1) * (last // (steps + 1))).round()[::-1][:-1].astype(np.int64) + c[
            "steps_offset"
        ]
    else:
        t = np.arange(last, 0, -n / steps).round().astype(np.int64) - 1
    sigmas = np.sqrt((1 - ac) / ac)
    log_sigmas = np.log(sigmas)
    if c["use_karras_sigmas"] or c["use_exponential_sigmas"]:
        convert = _karras if c["use_karras_sigmas"] else _exponential
        sigmas = convert(float(sigmas[-1]), float(sigmas[0]), steps)
        t = _sigma_to_t(sigmas, log_sigmas)
        if c["use_karras_sigmas"] and c["beta_schedule"] != "squaredcos_cap_v2":
            t = t.round()
    elif c["use_flow_sigmas"]:
        s = 1.0 - np.linspace(1, 1 / n, steps + 1)
        sigmas = np.flip(flow_shift * s / (1 + (flow_shift - 1) * s))[:-1].copy()
        t = sigmas * n
    else:
        sigmas = np.interp(t, np.arange(len(sigmas)), sigmas)
    last_sigma = float(np.sqrt((1 - ac[0]) / ac[0])) if c["final_sigmas_type"] == "sigma_min" else 0.0
    return np.concatenate([sigmas, [last_sigma]]).astype(np.float32), np.asarray(t).astype(np.int64)


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' _sigma_to_t: the fractional training timestep of each σ, interpolated in log σ."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)


def _dpm(c: dict, steps: int, mu=None, **_) -> dict:
    """DPM-Solver++ (midpoint or Heun), orders 1–3 with diffusers' lower-order warm-up and final steps.

    x_t = (σ_t/σ_s)·x + φ·D0 + ψ·D1 − χ·D2 over the data predictions m0 = x0, m1 = x0_prev, m2 = x0_prev2.
    """
    sig, t = dpm_sigmas(c, steps, mu)
    sig = sig.astype(np.float64)
    flow = c["use_flow_sigmas"]
    alpha = 1 - sig if flow else 1 / np.sqrt(sig**2 + 1)
    sigma = sig if flow else sig * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # +inf at a final σ of 0
    n, order = len(t), c["solver_order"]
    out = {k: np.zeros(n) for k in ("p", "q", "a", "b", "c", "e")}
    pred = c["prediction_type"]
    for i in range(n):
        a_s, s_s, a_t, s_t = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
        # x0 from the model output at σ_i
        out["p"][i], out["q"][i] = {
            "epsilon": (1 / a_s, -s_s / a_s),
            "v_prediction": (a_s, -s_s),
            "flow_prediction": (1.0, -sig[i]),
            "sample": (0.0, 1.0),
        }[pred]
        last = i == n - 1
        lower_final = last and (
            c["euler_at_final"] or (c["lower_order_final"] and n < 15) or c["final_sigmas_type"] == "zero"
        )
        lower_second = i == n - 2 and c["lower_order_final"] and n < 15
        k = 1 if (order == 1 or i < 1 or lower_final) else 2 if (order == 2 or i < 2 or lower_second) else 3
        h = lam[i + 1] - lam[i]
        em1 = np.expm1(-h)  # e^{−h} − 1; −1 when h = inf
        phi = -a_t * em1
        coef = np.array([phi, 0.0, 0.0])  # on (m0, m1, m2)
        if k >= 2:
            r0 = (lam[i] - lam[i - 1]) / h
            d1_0 = np.array([1.0, -1.0, 0.0]) / r0
        if k == 2:
            if c["solver_type"] == "midpoint":
                coef += 0.5 * phi * d1_0
            else:
                coef += a_t * (em1 / h + 1.0) * d1_0
        elif k == 3:
            r1 = (lam[i - 1] - lam[i - 2]) / h
            d1_1 = np.array([0.0, 1.0, -1.0]) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            coef += a_t * (em1 / h + 1.0) * d1 - a_t * ((em1 + h) / h**2 - 0.5) * d2
        out["a"][i] = s_t / s_s
        out["b"][i], out["c"][i], out["e"][i] = coef
    return {"t": t, **out}


# ------------------------------------------------------------------------------------------ Euler (σ-space, ε/v)


def euler_sigmas(c: dict, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """EulerDiscreteScheduler.set_timesteps -> (σ incl. the final one, float32; float timesteps)."""
    n = c["num_train_timesteps"]
    if c["timestep_spacing"] == "linspace":
        t = np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
    elif c["timestep_spacing"] == "leading":
        t = (np.arange(steps) * (n // steps)).round()[::-1].astype(np.float32) + c["steps_offset"]
    else:
        t = np.arange(n, 0, -n / steps).round().astype(np.float32) - 1
    ac = alphas_cumprod(c)
    if c["rescale_betas_zero_snr"]:
        ac[-1] = 2.0**-24
    train = np.sqrt((1 - ac) / ac)
    log_sigmas = np.log(train)
    sigmas = np.interp(t, np.arange(len(train)), train)
    if c["use_karras_sigmas"] or c["use_exponential_sigmas"]:
        convert = _karras if c["use_karras_sigmas"] else _exponential
        top = c["sigma_max"] if c["sigma_max"] is not None else float(sigmas[0])
        low = c["sigma_min"] if c["sigma_min"] is not None else float(sigmas[-1])
        sigmas = convert(top, low, steps)
        t = _sigma_to_t(sigmas, log_sigmas)
    last = float(np.sqrt((1 - ac[0]) / ac[0])) if c["final_sigmas_type"] == "sigma_min" else 0.0
    return np.concatenate([sigmas, [last]]).astype(np.float32), np.asarray(t).astype(np.float32)


def _euler(c: dict, steps: int, scales_initial_noise: bool = False, **_) -> dict:
    """EulerDiscreteScheduler.step (no churn) on the state the model sees, y = x_σ/√(σ²+1) (its scale_model_input).

    x0 from y and g; x_σ' = x_σ + (σ'−σ)·(x_σ − x0)/σ, rescaled to y' = x_σ'/√(σ'²+1): linear in y and x0. The
    initial noise is scaled into y (by init_noise_sigma where the pipeline applies it), the result back to x_σ.
    """
    s, t = euler_sigmas(c, steps)
    s = s.astype(np.float64)
    c_in = 1 / np.sqrt(s**2 + 1)
    pred = c["prediction_type"]
    p, q = {"epsilon": (1 / c_in[:-1], -s[:-1]), "v_prediction": (c_in[:-1], -s[:-1] * c_in[:-1])}.get(
        pred, (np.zeros(steps), np.ones(steps))
    )  # sample / original_sample: x0 = g
    ratio = s[1:] / s[:-1]
    init_sigma = s.max() if c["timestep_spacing"] in ("linspace", "trailing") else math.sqrt(s.max() ** 2 + 1)
    return {
        "t": t,
        "p": p,
        "q": q,
        "a": c_in[1:] * ratio / c_in[:-1],
        "b": c_in[1:] * (1 - ratio),
        "init": (init_sigma if scales_initial_noise else 1.0) * c_in[0],
        "final": 1 / c_in[-1],
    }


# ----------------------------------------------------------------------------------------------- the registry


@dataclass(frozen=True, eq=False)  # one value per class: compared and hashed by identity
class SchedulerKind:
    """One supported diffusers scheduler class: what this module knows about it."""

    cls: str  # the diffusers class name, a config's "_class_name"
    defaults: dict  # constructor defaults (diffusers 0.3x), so a partial config means what it means there
    allowed: dict  # option -> the values reproduced, others refused (_WHY); unlisted options: any value
    plan: Callable  # (full config, steps, **timestep_args) -> the raw per-step scalars make_plan completes
    label: str  # the sampler's name in A1111-style PNG metadata, {order} and {sigmas} filled in by label()
    flow_options: dict | None = None  # what makes it sample a flow model (with the shift); None: ε/v/x0 only
    shift_key: str | None = None  # the option holding its static flow shift
    gives_x0: bool = False  # its step returns pred_original_sample (PixArt-α's one-step result)


_BETAS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "rescale_betas_zero_snr": False,
}
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_SPACINGS = ("leading", "trailing", "linspace")
FLOW = SchedulerKind(
    "FlowMatchEulerDiscreteScheduler",
    plan=_flow_euler,
    label="Euler",
    flow_options={},
    shift_key="shift",
    defaults={
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "invert_sigmas": False,
        "shift_terminal": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "time_shift_type": "exponential",
        "stochastic_sampling": False,
    },
    allowed={
        "invert_sigmas": (False,),
        "use_beta_sigmas": (False,),
        "stochastic_sampling": (False,),
        "time_shift_type": ("exponential", "linear"),
    },
)
DDIM = SchedulerKind(
    "DDIMScheduler",
    plan=_ddim,
    label="DDIM",
    gives_x0=True,
    defaults={
        **_BETAS,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
    },
    allowed={
        "thresholding": (False,),
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "timestep_spacing": _SPACINGS,
        "beta_schedule": _BETA_SCHEDULES,
    },
)
DPM = SchedulerKind(
    "DPMSolverMultistepScheduler",
    plan=_dpm,
    label="DPM++ {order}{sigmas}",
    shift_key="flow_shift",
    flow_options={"prediction_type": "flow_prediction", "use_flow_sigmas": True},
    defaults={
        **_BETAS,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf,
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    },
    allowed={
        "thresholding": (False,),
        "algorithm_type": ("dpmsolver++",),
        "solver_type": ("midpoint", "heun"),
        "solver_order": (1, 2, 3),
        "use_beta_sigmas": (False,),
        "use_lu_lambdas": (False,),
        "variance_type": (None,),
        "final_sigmas_type": ("zero", "sigma_min"),
        "prediction_type": ("epsilon", "v_prediction", "sample", "flow_prediction"),
        "timestep_spacing": _SPACINGS,
        "time_shift_type": ("exponential",),
        "beta_schedule": _BETA_SCHEDULES,
    },
)
EULER = SchedulerKind(
    "EulerDiscreteScheduler",
    plan=_euler,
    label="Euler{sigmas}",
    gives_x0=True,
    defaults={
        **_BETAS,
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "steps_offset": 0,
        "final_sigmas_type": "zero",
    },
    allowed={
        "prediction_type": ("epsilon", "v_prediction", "sample", "original_sample"),
        "interpolation_type": ("linear",),
        "use_beta_sigmas": (False,),
        "timestep_type": ("discrete",),
        "timestep_spacing": _SPACINGS,
        "final_sigmas_type": ("zero", "sigma_min"),
        "beta_schedule": _BETA_SCHEDULES,
    },
)
SCHEDULERS = {kind.cls: kind for kind in (FLOW, DDIM, DPM, EULER)}

# --sampler names: (class, options), applied as diffusers' `X.from_config(current_config, **options)`.
# "euler" is FlowMatchEulerDiscreteScheduler for a flow model and EulerDiscreteScheduler for the others.
SAMPLERS = {
    "euler": (FLOW, {}),
    "euler-karras": (EULER, {"use_karras_sigmas": True}),
    "ddim": (DDIM, {}),
    "dpm++1": (DPM, {"solver_order": 1}),
    "dpm++2m": (DPM, {"solver_order": 2}),
    "dpm++2m-karras": (DPM, {"solver_order": 2, "use_karras_sigmas": True}),
    "dpm++3m": (DPM, {"solver_order": 3}),
    **{kind.cls: (kind, {}) for kind in SCHEDULERS.values()},
}


# --------------------------------------------------------------------------------------------------- the plan


def timestep_args(config: dict, call: dict, steps: int) -> dict:
    """What the diffusers pipeline passes to set_timesteps besides the step count: custom sigmas and/or μ.

    call (from the manifest): custom_sigmas "linspace" (Flux: linspace(1, 1/n, n) unless the scheduler uses flow
    sigmas), mu "always" (Flux) or "dynamic" (SD3: when use_dynamic_shifting), image_seq_len, mu_defaults (the
    pipeline's fallbacks for base/max sequence length and shift when the config lacks them), and
    scales_initial_noise (PixArt multiplies its initial latents by the scheduler's init_noise_sigma).
    """
    kw = {"scales_initial_noise": True} if call.get("scales_initial_noise") else {}  # matters for Euler only
    if call.get("custom_sigmas") == "linspace" and not config.get("use_flow_sigmas"):
        kw["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    if call.get("mu") == "always" or (call.get("mu") == "dynamic" and config.get("use_dynamic_shifting")):
        base_len, max_len, base, top = call.get("mu_defaults", (256, 4096, 0.5, 1.15))
        kw["mu"] = calculate_shift(
            call["image_seq_len"],
            config.get("base_image_seq_len", base_len),
            config.get("max_image_seq_len", max_len),
            config.get("base_shift", base),
            config.get("max_shift", top),
        )
    return kw


def make_plan(config: dict, steps: int, call: dict | None = None) -> dict[str, np.ndarray]:
    """Per-step float32 scalars (STEP_SCALARS) of `steps` sampler steps, and "init"/"final": the factors of the
    initial noise and of the final latents (1 but for EulerDiscreteScheduler), and "final_from_x0" (the result is
    the last step's x0, not x_next). The config must pass check_config."""
    config = full_config(config)
    kind = SCHEDULERS[config["_class_name"]]
    try:
        with np.errstate(all="ignore"):
            raw = kind.plan(config, steps, **timestep_args(config, call or {}, steps))
    except (ArithmeticError, IndexError) as e:  # e.g. base_image_seq_len == max_image_seq_len, exp overflow
        raise ConfigError(
            f"{config['_class_name']} gives an undefined schedule at {steps} step(s) "
            f"({type(e).__name__}: {e}); check the scheduler's options"
        ) from None
    n = len(raw["t"])
    plan = {k: np.asarray(raw.get(k, np.zeros(n)), dtype=np.float64) for k in STEP_SCALARS if k != "clip"}
    plan["clip"] = np.asarray(raw.get("clip", np.full(n, math.inf)), dtype=np.float64)
    if not all(np.isfinite(v).all() for k, v in plan.items() if k != "clip"):
        raise ConfigError(
            f"{config['_class_name']} gives an undefined (non-finite) schedule at {steps} step(s), as in "
            "diffusers; check the step count and the scheduler's options (shift, sigmas)"
        )
    plan = {k: v.astype(np.float32) for k, v in plan.items()}
    # PixArtAlphaPipeline returns the step's pred_original_sample when it takes a single step
    from_x0 = bool((call or {}).get("one_step_x0")) and n == 1
    if from_x0 and not kind.gives_x0:
        raise ConfigError(
            f"this pipeline cannot take 1 step with {config['_class_name']} (diffusers fails: the step "
            "returns no pred_original_sample); use 2 or more steps"
        )
    return {
        **plan,
        "init": np.float32(raw.get("init", 1.0)),
        "final": np.float32(raw.get("final", 1.0)),
        "final_from_x0": from_x0,
    }
