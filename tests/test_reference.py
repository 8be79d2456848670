"""Schedules and every sampler step against diffusers' schedulers, for the same noise predictions and noise.

The schedule tensors are compared as each library builds them (float32). The steps are compared in float64 with
diffusers' scheduler given our float64 schedule, so that a difference can only come from the update formulas:
in float32, 1 - alpha_bar_t near t = 1 and x_0 = (x_t - sigma_t eps) / alpha_t near alpha_bar_T ~ 1e-8 (cosine)
cancel so much that two correct implementations differ by more than 1e-5.
"""

import pytest
import torch

from ddpm_lightning.diffusion.samplers import ancestral, ddim, dpm_solver, timesteps
from ddpm_lightning.diffusion.schedule import build_schedule

diffusers = pytest.importorskip("diffusers")
T = 500
LINEAR = build_schedule("linear", T=T).to("cpu", torch.float64)
KIND_TO_DIFFUSERS = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def eps_fn(x, t):
    """A fixed stand-in for a trained network: the optimal predictor for data ~ N(0.3, 0.5^2) under the linear
    schedule, plus a nonlinear term, so that states stay O(1) as they do with a real model."""
    ab = LINEAR.alpha_bar[t][:, None, None, None]
    return (1 - ab).sqrt() * (x - ab.sqrt() * 0.3) / (ab * 0.25 + 1 - ab) + 0.05 * torch.sin(3 * x)


def reference(cls, kind, **kw):
    return cls(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule=KIND_TO_DIFFUSERS[kind], **kw)


def float64_pair(cls, kind, steps, spacing=None, **kw):
    """Our schedule in float64, and diffusers' scheduler with its tensors replaced by the same float64 values
    (on our subsequence of steps when ``spacing`` is given)."""
    ours = build_schedule(kind, T=T).to("cpu", torch.float64)
    ref = reference(cls, kind, **kw)
    if spacing is None:
        ref.set_timesteps(steps)
    else:
        ref.set_timesteps(timesteps=timesteps(T, steps, spacing))
    ref.betas, ref.alphas, ref.alphas_cumprod = ours.betas, ours.alphas, ours.alpha_bar
    if hasattr(ref, "final_alpha_cumprod"):
        ref.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    if cls is diffusers.DPMSolverMultistepScheduler:  # its sigmas are the VE ones, sqrt((1 - alpha_bar) / alpha_bar)
        ab = ours.alpha_bar[ref.timesteps]
        ref.sigmas = torch.cat([((1 - ab) / ab).sqrt(), torch.zeros(1, dtype=torch.float64)])
    return ours, ref


def x_T():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def trajectory(sampler, schedule, x_T, seed, **kw):
    """Our sampler's state after every step, with the random generator's state at that point."""
    g = torch.Generator().manual_seed(seed)
    steps = [(x_T, g.get_state())]
    sampler(eps_fn, schedule, x_T, g, callback=lambda i, x: steps.append((x.clone(), g.get_state())), **kw)
    return steps


def assert_every_step_equal(scheduler, ours, **step_kw):
    """Each of diffusers' steps, taken from our state before it with the same random state, lands on our next state."""
    assert len(ours) == len(scheduler.timesteps) + 1
    g = torch.Generator()
    for k, t in enumerate(scheduler.timesteps):
        (x, state), (expected, _) = ours[k], ours[k + 1]
        g.set_state(state)
        x_next = scheduler.step(eps_fn(x, t.expand(x.shape[0])), t, x, generator=g, **step_kw).prev_sample
        torch.testing.assert_close(
            x_next, expected, rtol=1e-5, atol=1e-5, msg=lambda m, k=k, t=t: f"step {k} (t={int(t)}): {m}"
        )


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_tensors_equal_diffusers(kind):
    ours, ref = build_schedule(kind, T=T), reference(diffusers.DDPMScheduler, kind)
    torch.testing.assert_close(ours.betas, ref.betas, rtol=1e-5, atol=0)
    # atol: the cosine alpha_bar_T is ~1e-8, where diffusers' float32 cumprod has drifted by 1e-13 from the float64 one
    torch.testing.assert_close(ours.alpha_bar, ref.alphas_cumprod, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("variance, variance_type", [("beta", "fixed_large"), ("posterior", "fixed_small")])
def test_ancestral_equals_ddpm_scheduler(variance, variance_type):
    ours, ref = float64_pair(diffusers.DDPMScheduler, "linear", T, variance_type=variance_type, clip_sample=False)
    assert_every_step_equal(ref, trajectory(ancestral, ours, x_T(), 1, variance=variance))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("steps, eta", [(50, 0.0), (10, 1.0), (25, 0.5)])
def test_ddim_equals_ddim_scheduler(kind, steps, eta):
    ours, ref = float64_pair(
        diffusers.DDIMScheduler, kind, steps, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing"
    )
    assert ref.timesteps.tolist() == timesteps(T, steps, "uniform")
    assert_every_step_equal(ref, trajectory(ddim, ours, x_T(), 1, steps=steps, eta=eta), eta=eta)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
def test_dpm_solver_equals_dpm_solver_multistep_scheduler(kind, steps, spacing):
    ours, ref = float64_pair(
        diffusers.DPMSolverMultistepScheduler,
        kind,
        steps,
        spacing,
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
    )
    assert_every_step_equal(ref, trajectory(dpm_solver, ours, x_T(), 1, steps=steps, spacing=spacing))


def test_uniform_spacing_is_diffusers_trailing():
    for steps in (7, 10, 20, 33, 50):
        ref = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, timestep_spacing="trailing")
        ref.set_timesteps(steps)
        assert ref.timesteps.tolist() == timesteps(T, steps, "uniform")


def assert_clipping_bites(ours_clipped, ours):
    """The clip changed the trajectory: the stand-in network's x_0 predictions leave [-1, 1]."""
    assert (ours_clipped[-1][0] - ours[-1][0]).abs().max() > 1e-3


def test_ancestral_clip_x0_equals_ddpm_scheduler_clip_sample():
    ours, ref = float64_pair(diffusers.DDPMScheduler, "linear", T, variance_type="fixed_large", clip_sample=True)
    clipped = trajectory(ancestral, ours, x_T(), 1, clip_x0=True)
    assert_clipping_bites(clipped, trajectory(ancestral, ours, x_T(), 1))
    assert_every_step_equal(ref, clipped)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ddim_clip_x0_equals_ddim_scheduler_clip_sample(kind):
    """With the eps re-derived from the clipped x_0 (diffusers' use_clipped_model_output; guided-diffusion's ddim)."""
    ours, ref = float64_pair(
        diffusers.DDIMScheduler, kind, 25, clip_sample=True, set_alpha_to_one=True, timestep_spacing="trailing"
    )
    clipped = trajectory(ddim, ours, x_T(), 1, steps=25, eta=0.5, clip_x0=True)
    assert_clipping_bites(clipped, trajectory(ddim, ours, x_T(), 1, steps=25, eta=0.5))
    assert_every_step_equal(ref, clipped, eta=0.5, use_clipped_model_output=True)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_dpm_solver_clip_x0_equals_thresholding_at_one(kind):
    """diffusers' dynamic thresholding with ratio 1 and sample_max_value 1 is the clip of x_0 to [-1, 1]."""
    ours, ref = float64_pair(
        diffusers.DPMSolverMultistepScheduler,
        kind,
        20,
        "quadratic",
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
        thresholding=True,
        dynamic_thresholding_ratio=1.0,
        sample_max_value=1.0,
    )
    clipped = trajectory(dpm_solver, ours, x_T(), 1, steps=20, spacing="quadratic", clip_x0=True)
    assert_clipping_bites(clipped, trajectory(dpm_solver, ours, x_T(), 1, steps=20, spacing="quadratic"))
    assert_every_step_equal(ref, clipped)
