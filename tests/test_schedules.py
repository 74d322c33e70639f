import numpy as np
import pytest
import torch

from ditrt.runtime.schedules import flow_euler_plan, flow_sigmas


def diffusers_scheduler(shift=1.0, dynamic=False):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=dynamic)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 20, 28])
def test_sigmas_and_timesteps_match_diffusers(shift, steps):
    ref = diffusers_scheduler(shift)
    ref.set_timesteps(steps)
    sigmas, timesteps = flow_sigmas(steps, shift)
    # both are float32 pipelines of the same formulas; differences are rounding only
    np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(timesteps, ref.timesteps.numpy(), rtol=0, atol=1e-3)
    assert sigmas[-1] == 0 and len(sigmas) == steps + 1


@pytest.mark.parametrize("mu", [0.5, 1.15])
def test_dynamic_shift_matches_diffusers(mu):
    ref = diffusers_scheduler(dynamic=True)
    ref.set_timesteps(10, mu=mu)
    sigmas, timesteps = flow_sigmas(10, mu=mu)
    np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(timesteps, ref.timesteps.numpy(), rtol=0, atol=1e-3)


def velocity(x, t):
    """A smooth nonlinear stand-in for a model: depends on x and t like a real one."""
    return np.tanh(x) * (t / 1000.0) - 0.3 * x + np.sin(t / 97.0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_trajectory_in_x0_form_matches_diffusers_step(shift):
    """The step graph's x0-form update reproduces scheduler.step over a whole trajectory."""
    steps = 12
    ref = diffusers_scheduler(shift)
    ref.set_timesteps(steps)
    x_ref = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 1, 4, 4)).astype(np.float32))
    x = x_ref.numpy().copy()
    x0_prev = np.zeros_like(x)
    plan = flow_euler_plan(steps, shift)
    for i, t in enumerate(ref.timesteps):
        v = velocity(x_ref.numpy(), float(t))
        x_ref = ref.step(torch.from_numpy(v), t, x_ref).prev_sample
        v = velocity(x, float(plan["t"][i]))
        x0 = plan["p"][i] * x + plan["q"][i] * v
        x = plan["a"][i] * x + plan["b"][i] * x0 + plan["c"][i] * x0_prev
        x0_prev = x0
    # 12 float32 steps of O(1) values; the two algebraic forms differ by rounding only
    np.testing.assert_allclose(x, x_ref.numpy(), rtol=0, atol=1e-5)


def test_plan_coefficients_are_euler():
    plan = flow_euler_plan(5, 3.0)
    sigmas, _ = flow_sigmas(5, 3.0)
    np.testing.assert_allclose(plan["a"] + plan["b"], 1.0, atol=1e-6)
    np.testing.assert_allclose(-plan["b"] * plan["q"], sigmas[:-1] - sigmas[1:], atol=1e-6)
    assert plan["b"][-1] == 1.0  # the last step lands on x0


def run_plan(plan, x, model):
    """The step graph's update, on the host: x0 = p·x + q·out; x_next = a·x + b·x0 + c·x0_prev."""
    x0_prev = np.zeros_like(x)
    for i, t in enumerate(plan["t"]):
        out = model(x, float(t))
        x0 = plan["p"][i] * x + plan["q"][i] * out
        x = plan["a"][i] * x + plan["b"][i] * x0 + plan["c"][i] * x0_prev
        x0_prev = x0
    return x


def run_diffusers(sched, x, model):
    x = torch.from_numpy(x)
    for t in sched.timesteps:
        x = sched.step(torch.from_numpy(model(x.numpy(), float(t))), t, x).prev_sample
    return x.numpy()


def eps_model(x, t):
    return np.tanh(x) * 0.5 + np.cos(t / 150.0) * 0.1 * x


@pytest.mark.parametrize("steps", [1, 10, 50])
def test_ddim_matches_diffusers(steps):
    from diffusers import DDIMScheduler

    from ditrt.runtime.schedules import ddim_plan

    ref = DDIMScheduler(beta_schedule="linear", prediction_type="epsilon", clip_sample=False)
    ref.set_timesteps(steps)
    plan = ddim_plan(steps)
    np.testing.assert_array_equal(plan["t"], ref.timesteps.numpy())
    x = np.random.default_rng(1).standard_normal((2, 4, 4)).astype(np.float32)
    # float32 on both sides; DDIM's 1/√ᾱ reaches ~150 at t = 999, so compare relative to the trajectory's scale
    want = run_diffusers(ref, x, eps_model)
    np.testing.assert_allclose(run_plan(plan, x, eps_model), want, rtol=0, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("steps", [1, 2, 5, 20])
def test_dpm_solver_eps_matches_diffusers(steps):
    from diffusers import DPMSolverMultistepScheduler

    from ditrt.runtime.schedules import dpm_plan

    ref = DPMSolverMultistepScheduler(beta_schedule="linear", prediction_type="epsilon")
    ref.set_timesteps(steps)
    plan = dpm_plan(steps)
    np.testing.assert_array_equal(plan["t"], ref.timesteps.numpy())
    x = np.random.default_rng(2).standard_normal((2, 4, 4)).astype(np.float32)
    want = run_diffusers(ref, x, eps_model)
    np.testing.assert_allclose(run_plan(plan, x, eps_model), want, rtol=0, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("steps", [1, 2, 5, 20])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_dpm_solver_matches_diffusers(steps, shift):
    from diffusers import DPMSolverMultistepScheduler

    from ditrt.runtime.schedules import flow_dpm_plan

    ref = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    ref.set_timesteps(steps)
    plan = flow_dpm_plan(steps, shift)
    np.testing.assert_array_equal(plan["t"], ref.timesteps.numpy())  # Sana's truncated int(σ·1000)
    x = np.random.default_rng(3).standard_normal((2, 4, 4)).astype(np.float32)
    # O(1) flow trajectories in float32: rounding only
    np.testing.assert_allclose(run_plan(plan, x, velocity), run_diffusers(ref, x, velocity), rtol=0, atol=2e-5)


@pytest.mark.parametrize("steps,size", [(4, 256), (28, 1024), (50, 512)])
def test_flux_schedule_matches_flux_pipeline(steps, size):
    """FluxPipeline passes sigmas = linspace(1, 1/n, n) and μ from the packed-token count."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_shift

    from ditrt.runtime.schedules import calculate_shift, flux_plan

    seq = (size // 16) ** 2
    mu = diffusers_shift(seq, 256, 4096, 0.5, 1.15)
    assert calculate_shift(seq) == pytest.approx(mu, abs=1e-12)
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    plan = flux_plan(steps, seq)
    np.testing.assert_allclose(plan["t"], ref.timesteps.numpy(), rtol=0, atol=1e-3)
    x = np.random.default_rng(4).standard_normal((1, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(run_plan(plan, x, velocity), run_diffusers(ref, x, velocity), rtol=0, atol=2e-5)
