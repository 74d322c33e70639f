"""The runtime's schedulers against diffusers' own: the same timesteps and whole trajectories, for every
supported class and option, and a one-line refusal for every option that is not reproduced."""

import math

import diffusers
import numpy as np
import pytest
import torch

from ditrt.runtime.errors import ConfigError
from ditrt.runtime.schedules import (
    SAMPLERS,
    SCHEDULERS,
    STEP_SCALARS,
    calculate_shift,
    check_config,
    full_config,
    make_plan,
    switch,
    timestep_args,
)

FLOW, DDIM, DPM = "FlowMatchEulerDiscreteScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"
EULER = "EulerDiscreteScheduler"
PIXART_CALL = {"scales_initial_noise": True}  # PixArt multiplies its initial latents by init_noise_sigma
FLUX_CALL = {
    "custom_sigmas": "linspace",
    "mu": "always",
    "image_seq_len": 1024,
    "mu_defaults": [256, 4096, 0.5, 1.15],
}
SD3_CALL = {"mu": "dynamic", "image_seq_len": 4096, "mu_defaults": [256, 4096, 0.5, 1.16]}

CASES = [  # (class, options, how the pipeline calls set_timesteps)
    (FLOW, {}, {}),
    (FLOW, {"shift": 3.0}, {}),
    (FLOW, {"shift": 3.0, "use_dynamic_shifting": True}, FLUX_CALL),  # FLUX.1-dev
    (FLOW, {"shift": 1.0}, FLUX_CALL),  # FLUX.1-schnell: μ is passed but static shifting ignores it
    (FLOW, {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.16}, SD3_CALL),
    (FLOW, {"use_dynamic_shifting": True, "time_shift_type": "linear"}, FLUX_CALL),
    (FLOW, {"shift": 3.0, "shift_terminal": 0.1}, {}),
    (FLOW, {"shift": 3.0, "use_karras_sigmas": True}, {}),
    (FLOW, {"use_exponential_sigmas": True}, {}),
    (DDIM, {}, {}),  # DDIMScheduler() defaults: clip_sample=True, leading spacing
    (DDIM, {"clip_sample": False}, {}),  # facebook/DiT-XL-2-256
    (DDIM, {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}, {}),
    (
        DDIM,
        {
            "clip_sample": False,
            "timestep_spacing": "linspace",
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
        },
        {},
    ),
    (
        DDIM,
        {
            "prediction_type": "v_prediction",
            "timestep_spacing": "trailing",
            "rescale_betas_zero_snr": True,
            "clip_sample": False,
        },
        {},
    ),
    (DDIM, {"prediction_type": "sample", "beta_schedule": "squaredcos_cap_v2", "clip_sample_range": 2.0}, {}),
    (DPM, {}, {}),  # PixArt-Σ
    (DPM, {"solver_order": 1}, {}),
    (DPM, {"solver_order": 3}, {}),
    (DPM, {"solver_type": "heun"}, {}),
    (DPM, {"use_karras_sigmas": True}, {}),
    (DPM, {"use_exponential_sigmas": True, "solver_order": 3}, {}),
    (DPM, {"final_sigmas_type": "sigma_min", "lower_order_final": False}, {}),
    (DPM, {"final_sigmas_type": "sigma_min", "solver_order": 3}, {}),
    (DPM, {"final_sigmas_type": "sigma_min", "euler_at_final": True}, {}),
    (DPM, {"timestep_spacing": "leading", "steps_offset": 1}, {}),
    (DPM, {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, {}),
    (DPM, {"lambda_min_clipped": -5.1, "beta_schedule": "squaredcos_cap_v2"}, {}),
    (
        DPM,
        {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
        {},
    ),
    (DPM, {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0}, {}),  # Sana
    (
        DPM,
        {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 7.0, "solver_order": 3},
        {},
    ),
    (EULER, {}, {}),  # DiTPipeline: no init_noise_sigma
    (EULER, {}, PIXART_CALL),
    (EULER, {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, PIXART_CALL),
    (
        EULER,
        {
            "timestep_spacing": "leading",
            "steps_offset": 1,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
        },
        PIXART_CALL,
    ),
    (EULER, {"use_karras_sigmas": True}, PIXART_CALL),
    (EULER, {"use_exponential_sigmas": True, "final_sigmas_type": "sigma_min"}, {}),
    (
        EULER,
        {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0, "prediction_type": "sample"},
        {},
    ),
]


def model_output(x: np.ndarray, t: float, i: int) -> np.ndarray:
    """A smooth nonlinear stand-in for a model: depends on x, t and the step like a real one."""
    return (np.tanh(x) * 0.5 + np.cos(t / 150.0) * 0.1 * x + 0.05 * np.sin(i + x)).astype(np.float32)


def run_diffusers(cls: str, options: dict, call: dict, steps: int, x: np.ndarray):
    sched = getattr(diffusers, cls).from_config({"_class_name": cls, **options})
    kw = timestep_args(full_config({"_class_name": cls, **options}), call, steps)
    if "sigmas" in kw:
        sched.set_timesteps(sigmas=kw["sigmas"], mu=kw.get("mu"))
    else:
        sched.set_timesteps(steps, **({"mu": kw["mu"]} if "mu" in kw else {}))
    x = torch.from_numpy(x) * (sched.init_noise_sigma if call.get("scales_initial_noise") else 1.0)
    for i, t in enumerate(sched.timesteps):
        seen = sched.scale_model_input(x, t) if cls != FLOW else x  # what the pipeline feeds the model
        x = sched.step(torch.from_numpy(model_output(seen.numpy(), float(t), i)), t, x).prev_sample
    return sched.timesteps.numpy(), x.numpy()


def run_plan(plan: dict, x: np.ndarray) -> np.ndarray:
    """The step engine's update on the host: x0 = clamp(p·x + q·g);
    x_next = a·x + b·x0 + c·x0_prev + e·x0_prev2 + d·g."""
    x = x * plan["init"]
    x0_prev = x0_prev2 = np.zeros_like(x)
    for i, t in enumerate(plan["t"]):
        g = model_output(x, float(t), i)
        x0 = np.clip(plan["p"][i] * x + plan["q"][i] * g, -plan["clip"][i], plan["clip"][i])
        x = (
            plan["a"][i] * x
            + plan["b"][i] * x0
            + plan["c"][i] * x0_prev
            + plan["e"][i] * x0_prev2
            + plan["d"][i] * g
        )
        x0_prev, x0_prev2 = x0, x0_prev
    return x * plan["final"]


@pytest.mark.parametrize("steps", [1, 4, 10, 20])
@pytest.mark.parametrize("cls,options,call", CASES, ids=[f"{c[:4]}-{o}" for c, o, _ in CASES])
def test_trajectory_matches_diffusers(cls, options, call, steps):
    config = check_config({"_class_name": cls, **options}, call)
    if steps == 1 and options.get("shift_terminal"):  # stretching one σ to the terminal value divides by zero
        with pytest.raises(ConfigError, match=r"undefined \(non-finite\) schedule at 1 step"):
            make_plan(config, steps, call)
        return
    plan = make_plan(config, steps, call)
    assert set(plan) == {*STEP_SCALARS, "init", "final", "final_from_x0"} and not plan["final_from_x0"]
    assert all(plan[k].dtype == np.float32 for k in (*STEP_SCALARS, "init", "final"))
    x = np.random.default_rng(steps).standard_normal((2, 3, 4, 4)).astype(np.float32)
    timesteps, want = run_diffusers(cls, options, call, steps, x)
    np.testing.assert_allclose(plan["t"], timesteps, rtol=0, atol=1e-3)  # ints, or σ·1000 in float32
    # float32 on both sides, the same formulas in another order: rounding only. ε-models amplify by up to
    # 1/√ᾱ ≈ 160 on the way, so the bound is relative to the trajectory's scale.
    got = run_plan(plan, x)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_defaults_are_diffusers_defaults(cls):
    ours = full_config({"_class_name": cls})
    theirs = {k: v for k, v in getattr(diffusers, cls)().config.items() if not k.startswith("_")}
    assert {k: ours[k] for k in theirs} == theirs
    assert set(ours) - {"_class_name", "_use_default_values"} == set(theirs)


@pytest.mark.parametrize("name", [n for n in SAMPLERS if n in SCHEDULERS])
@pytest.mark.parametrize(
    "start",
    [
        (DPM, {}),
        (DDIM, {"clip_sample": False, "steps_offset": 1}),
        (DPM, {"timestep_spacing": "trailing", "solver_order": 3}),
        (DDIM, {"clip_sample": False, "timestep_spacing": "leading", "beta_end": 0.012}),
    ],
)
def test_switching_is_from_config(start, name):
    """`--sampler X` on an ε-model: what diffusers' X.from_config(current config) registers."""
    if name == FLOW:
        with pytest.raises(ConfigError, match="needs a flow model; this model predicts epsilon"):
            switch(full_config({"_class_name": start[0], **start[1]}), name, "epsilon")
        return
    folder = {"_class_name": start[0], **start[1]}  # a scheduler_config.json that leaves most options out
    ours = switch(full_config(folder), name, "epsilon")
    theirs = (
        getattr(diffusers, name).from_config(getattr(diffusers, start[0]).from_config(folder).config).config
    )
    defaults = SCHEDULERS[name].defaults
    assert {k: ours[k] for k in defaults} == {k: theirs[k] for k in defaults}


def test_switching_a_flow_model_keeps_flow_prediction_and_shift():
    sana = full_config(
        {"_class_name": DPM, "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0}
    )
    euler = switch(sana, "euler", "flow")
    assert euler["_class_name"] == FLOW and euler["shift"] == 3.0
    assert switch(full_config({"_class_name": FLOW}), "euler", "flow", shift=2.0)["shift"] == 2.0
    assert (
        make_plan(switch(full_config({"_class_name": FLOW}), "euler", "flow", shift=2.0), 4)["q"][1]
        != make_plan(full_config({"_class_name": FLOW}), 4)["q"][1]
    )  # the shift reaches the plan
    back = switch(euler, "dpm++3m", "flow", shift=7.0)
    assert (back["prediction_type"], back["use_flow_sigmas"], back["flow_shift"], back["solver_order"]) == (
        "flow_prediction",
        True,
        7.0,
        3,
    )
    with pytest.raises(ConfigError, match="'ddim' .* needs an epsilon/v-prediction model"):
        switch(sana, "ddim", "flow")
    with pytest.raises(ConfigError, match="unknown sampler 'lms'; choose from euler, euler-karras, ddim"):
        switch(sana, "lms", "flow")
    with pytest.raises(ConfigError, match="shift -1 is not allowed"):
        switch(sana, "euler", "flow", shift=-1)


def test_shift_does_not_apply_to_dynamic_shifting():
    flux = full_config({"_class_name": FLOW, "shift": 3.0, "use_dynamic_shifting": True})
    with pytest.raises(ConfigError, match="--shift 2.0 does not apply"):
        switch(flux, "euler", "flow", shift=2.0)


@pytest.mark.parametrize(
    "cls,options,fragment",
    [
        (
            "EulerAncestralDiscreteScheduler",
            {},
            "scheduler class 'EulerAncestralDiscreteScheduler' is not supported; "
            "supported: FlowMatchEulerDiscreteScheduler, DDIMScheduler",
        ),
        (
            DDIM,
            {"thresholding": True},
            "DDIMScheduler option thresholding=True is not supported (dynamic thresholding",
        ),
        (
            DPM,
            {"algorithm_type": "sde-dpmsolver++"},
            "option algorithm_type='sde-dpmsolver++' is not supported",
        ),
        (DPM, {"use_lu_lambdas": True}, "option use_lu_lambdas=True is not supported"),
        (DPM, {"variance_type": "learned_range"}, "variance_type='learned_range' is not supported"),
        (FLOW, {"stochastic_sampling": True}, "stochastic_sampling=True is not supported (it draws noise"),
        (FLOW, {"invert_sigmas": True}, "invert_sigmas=True is not supported"),
        (FLOW, {"use_beta_sigmas": True}, "use_beta_sigmas=True is not supported"),
        (FLOW, {"use_karras_sigmas": True, "use_exponential_sigmas": True}, "only one of use_karras_sigmas"),
        (DDIM, {"trained_betas": [0.1, 0.2]}, "trained_betas has 2 values, num_train_timesteps is 1000"),
        (FLOW, {"shift": "3"}, "option shift='3' is not allowed; expected a positive number"),
        (FLOW, {"shift": -1.0}, "option shift=-1.0 is not allowed; expected a positive number"),
        (DDIM, {"clip_sample": "yes"}, "option clip_sample='yes' is not allowed; expected true or false"),
        (DPM, {"solver_order": 2.0}, "option solver_order=2.0 is not allowed; expected an integer > 0"),
        (
            "EulerDiscreteScheduler",
            {"timestep_type": "continuous"},
            "option timestep_type='continuous' is not supported",
        ),
    ],
)
def test_unsupported_options_are_refused_in_one_line(cls, options, fragment):
    with pytest.raises(ConfigError) as e:
        check_config({"_class_name": cls, **options})
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_flux_pipeline_cannot_take_dpm_solver():
    """FluxPipeline passes custom sigmas; diffusers' DPMSolverMultistepScheduler rejects them, and so do we."""
    with pytest.raises(ConfigError, match="passes its own sigmas"):
        check_config({"_class_name": DPM}, FLUX_CALL)


def test_flux_mu_is_the_pipelines():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_shift

    for seq in (256, 1024, 4096):
        assert calculate_shift(seq) == pytest.approx(diffusers_shift(seq), abs=1e-12)
    assert math.isclose(
        timestep_args(full_config({"_class_name": FLOW, "use_dynamic_shifting": True}), SD3_CALL, 28)["mu"],
        diffusers_shift(4096, 256, 4096, 0.5, 1.15),
    )


def test_options_a_folder_leaves_out_are_not_carried_to_another_class():
    """DiT-XL-2-256's scheduler_config.json (diffusers 0.12) has no timestep_spacing: switching to DPM-Solver++
    gives DPM's own default (linspace), not DDIM's (leading), as diffusers' from_config does."""
    dit = full_config({"_class_name": DDIM, "clip_sample": False, "beta_schedule": "linear"})
    assert dit["timestep_spacing"] == "leading" and "timestep_spacing" in dit["_use_default_values"]
    assert switch(dit, "dpm++2m", "epsilon")["timestep_spacing"] == "linspace"
    explicit = full_config({"_class_name": DDIM, "timestep_spacing": "leading"})
    assert switch(explicit, "dpm++2m", "epsilon")["timestep_spacing"] == "leading"


@pytest.mark.parametrize(
    "cls,options,call,steps,fragment",
    [
        (
            FLOW,
            {"use_dynamic_shifting": True},
            {},
            4,
            "needs the resolution shift (mu), which this pipeline does not",
        ),
        (
            DPM,
            {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "use_karras_sigmas": True},
            {},
            4,
            "give NaN in diffusers",
        ),
        (DDIM, {"steps_offset": 1}, {}, 1000, "reaches timestep 1000, outside 0..999"),
        (
            DDIM,
            {"num_train_timesteps": 100},
            {},
            200,
            "cannot take 200 steps: more than num_train_timesteps=100",
        ),
        (
            FLOW,
            {"use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 256},
            FLUX_CALL,
            4,
            "undefined schedule at 4 step(s) (ZeroDivisionError",
        ),
        (
            FLOW,
            {"use_dynamic_shifting": True, "base_shift": 1000.0, "max_shift": 1000.0},
            FLUX_CALL,
            4,
            "undefined schedule at 4 step(s) (OverflowError",
        ),
        (DPM, {}, {"one_step_x0": True}, 1, "cannot take 1 step with DPMSolverMultistepScheduler"),
    ],
)
def test_schedules_diffusers_cannot_run_are_refused(cls, options, call, steps, fragment):
    with pytest.raises(ConfigError) as e:
        make_plan(check_config({"_class_name": cls, **options}, call), steps, call)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_one_step_pixart_alpha_returns_the_steps_x0():
    for cls in (DDIM, EULER):
        assert make_plan({"_class_name": cls}, 1, {"one_step_x0": True})["final_from_x0"]
        assert not make_plan({"_class_name": cls}, 2, {"one_step_x0": True})["final_from_x0"]
