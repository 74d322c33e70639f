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
