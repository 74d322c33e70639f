import threading

import numpy as np
import pytest
import torch
from PIL import Image

from ditrt.runtime import InputError, Pipeline
from ditrt.runtime.pipeline import initial_noise


@pytest.fixture(scope="module")
def pipe(digits_engine):
    with Pipeline.load(digits_engine) as p:
        yield p


def test_same_seed_same_image_across_loads(pipe, digits_engine):
    a = pipe(class_label=3, seed=123, steps=6)
    with Pipeline.load(digits_engine) as other:
        b = other(class_label=3, seed=123, steps=6)
    assert np.array_equal(a.images[0], b.images[0]) and a.seeds == b.seeds == [123]
    c = pipe(class_label=3, seed=124, steps=6)
    assert not np.array_equal(a.images[0], c.images[0])


def test_batch_image_i_equals_single_image_with_seed_plus_i(pipe):
    batch = pipe(class_label=5, seed=40, steps=6, batch_size=3)
    assert batch.seeds == [40, 41, 42] and len(batch.images) == 3
    single = pipe(class_label=5, seed=42, steps=6)
    # batch and single runs use different GEMM shapes, hence last-bit differences before rounding to uint8
    assert np.abs(batch.images[2].astype(int) - single.images[0].astype(int)).max() <= 1


def test_random_seed_is_reported(pipe):
    r = pipe(class_label=1, seed=-1, steps=2)
    assert 0 <= r.seeds[0] < 2**31 and f"Seed: {r.seeds[0]}," in r.parameters[0]


def test_matches_diffusers_scheduler_loop_over_the_torch_model(pipe):
    """The whole engine loop equals a diffusers FlowMatchEulerDiscreteScheduler loop over our torch model."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ditrt.export.presets import build_preset, get_preset

    model, steps, g = build_preset(get_preset("digits")), 8, 3.0
    sched = FlowMatchEulerDiscreteScheduler(shift=pipe.manifest.scheduler.config["shift"])
    sched.set_timesteps(steps)
    x = torch.from_numpy(initial_noise([7, 8], (1, 16, 16)))
    y = torch.tensor([4, 4, 10, 10])
    with torch.no_grad():
        for t in sched.timesteps:
            cond, uncond = model(torch.cat([x, x]), t.expand(4), y).chunk(2)
            x = sched.step(uncond + g * (cond - uncond), t, x).prev_sample
    ours = pipe(class_label=4, seed=7, batch_size=2, steps=steps, guidance=g).pixels[..., 0]
    # fp32; 8 steps of O(1) latents, ORT vs torch kernels differ by rounding only (pixels = (x + 1) / 2, clamped)
    np.testing.assert_allclose(ours, ((x.numpy()[:, 0] + 1) / 2).clip(0, 1), rtol=0, atol=1e-4)


def test_concurrent_calls_are_independent(pipe):
    expected = {label: pipe(class_label=label, seed=label, steps=4).images[0] for label in range(4)}
    results, errors = {}, []

    def work(label):
        try:
            results[label] = pipe(class_label=label, seed=label, steps=4).images[0]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(label,)) for label in range(4) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for label in range(4):
        assert np.array_equal(results[label], expected[label])


def test_timings_and_defaults(pipe):
    r = pipe(class_label="7", seed=0)
    m = pipe.manifest.scheduler
    assert (
        f"Steps: {m.default_steps}," in r.parameters[0]
        and f"CFG scale: {m.default_guidance:g}," in r.parameters[0]
    )
    for k in (
        "load",
        "text_encode",
        "denoise_total",
        "denoise_per_step",
        "denoise_engine",
        "decode",
        "total",
    ):
        assert r.timings_ms[k] >= 0
    assert r.timings_ms["denoise_engine"] <= r.timings_ms["denoise_total"]
    assert r.images[0].dtype == np.uint8 and r.images[0].shape == (16, 16)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"class_label": 10}, "class label 10 is out of range.*0..9"),
        ({"class_label": -1}, "class label -1 is out of range"),
        ({"class_label": "seven"}, "class label 'seven' is out of range"),
        ({}, "needs a class label"),
        ({"class_label": 1, "steps": 0}, "steps 0 is not allowed"),
        ({"class_label": 1, "steps": 2.5}, "steps 2.5 is not allowed"),
        ({"class_label": 1, "guidance": -0.5}, "guidance -0.5 is not allowed"),
        ({"class_label": 1, "guidance": float("nan")}, "guidance nan is not allowed"),
        ({"class_label": 1, "batch_size": 0}, "batch_size 0 is not allowed"),
        ({"class_label": 1, "batch_size": 1000}, "batch_size 1000 is not allowed"),
        ({"class_label": 1, "guidance": 101}, "guidance 101 is not allowed; use a finite number in 0..100"),
        ({"class_label": 1, "sampler": "heun"}, "unknown sampler 'heun'"),
        (
            {"class_label": 1, "max_sequence_length": 64},
            "max_sequence_length 64 cannot be chosen for this engine folder",
        ),
        ({"class_label": 1, "latents": np.zeros((1, 1, 8, 8), np.float32)}, "latents of shape .1, 1, 8, 8."),
        (
            {"class_label": 1, "latents": [[0.0]]},
            "latents of list are not allowed; give a float32 array of shape",
        ),
        ({"class_label": 1, "latents": np.zeros((1, 1, 16, 16))}, "latents of shape .* dtype float64"),
        (
            {"class_label": 1, "latents": np.full((1, 1, 16, 16), 3e38, np.float32)},
            "non-finite values .guidance 3",
        ),
        (
            {"class_label": 1, "latents": np.full((1, 1, 16, 16), np.nan, np.float32)},
            "latents hold non-finite values",
        ),
        ({"class_label": 1, "sampler": ""}, "unknown sampler ''"),
    ],
)
def test_bad_requests(pipe, kwargs, match):
    with pytest.raises(InputError, match=match):
        pipe(**kwargs)


def test_png_parameters_and_naming(pipe, tmp_path):
    r = pipe(class_label=2, seed=9, steps=3, guidance=2.5, batch_size=2)
    paths = r.save(tmp_path / "two.png")
    assert [p.name for p in paths] == ["two-0000.png", "two-0001.png"]
    text = Image.open(paths[1]).text["parameters"]
    assert (
        text == "class 2 (2)\nSteps: 3, Sampler: Euler, CFG scale: 2.5, Seed: 10, Size: 16x16, Model: digits"
    )
    assert np.array_equal(np.asarray(Image.open(paths[0])), r.images[0])
    single = pipe(class_label=2, seed=9, steps=3).save(tmp_path / "one.png", metadata=False)
    assert single == [tmp_path / "one.png"] and "parameters" not in Image.open(single[0]).text


def test_save_refuses_to_overwrite_and_bad_paths(pipe, tmp_path):
    r = pipe(class_label=2, seed=9, steps=2, batch_size=2)
    (tmp_path / "x-0001.png").write_bytes(b"precious")
    with pytest.raises(InputError, match="x-0001.png' already exists"):
        r.save(tmp_path / "x.png")
    assert not (tmp_path / "x-0000.png").exists()  # checked before anything is written
    with pytest.raises(InputError, match="must end in .png"):
        r.save(tmp_path / "x.jpg")
    with pytest.raises(InputError, match="does not exist"):
        r.save(tmp_path / "missing" / "x.png")
    r.save(tmp_path / "x.png", overwrite=True)
    assert (tmp_path / "x-0001.png").read_bytes() != b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-0000.png", "x-0001.png"]  # no temp files


def test_guidance_at_most_one_runs_the_conditional_branch_alone(pipe):
    """diffusers' rule (guidance > 1: CFG): at 1 and below the image is the conditional model's, whatever g."""
    at_one, below, zero = (pipe(class_label=5, seed=2, steps=6, guidance=g).pixels for g in (1.0, 0.5, 0.0))
    np.testing.assert_array_equal(at_one, below)
    np.testing.assert_array_equal(at_one, zero)
    assert np.abs(pipe(class_label=5, seed=2, steps=6, guidance=1.5).pixels - at_one).max() > 1e-3


def test_sampler_switch_is_recorded_and_changes_the_image(pipe):
    assert pipe.samplers[:2] == ["euler", "dpm++1"] and "ddim" not in pipe.samplers  # a flow model
    euler = pipe(class_label=3, seed=1, steps=8)
    dpm = pipe(class_label=3, seed=1, steps=8, sampler="dpm++2m")
    shifted = pipe(class_label=3, seed=1, steps=8, shift=3.0)
    assert "Sampler: Euler," in euler.parameters[0] and "Sampler: DPM++ 2M," in dpm.parameters[0]
    assert (
        np.abs(dpm.pixels - euler.pixels).max() > 1e-3 and np.abs(shifted.pixels - euler.pixels).max() > 1e-3
    )


def test_result_holds_the_final_latents(digits_engine):
    """Result.latents is what the sampler ended with (diffusers' output_type="latent"): for a model without a VAE,
    the pixels in [-1, 1] that the images are made from."""
    from ditrt.runtime import Pipeline

    with Pipeline.load(digits_engine) as pipe:
        r = pipe(class_label=3, seed=5, steps=4, batch_size=2)
    assert r.latents.shape == (2, 1, 16, 16) and r.latents.dtype == np.float32
    np.testing.assert_array_equal(r.pixels[..., 0], np.clip((r.latents[:, 0] + 1) / 2, 0, 1))


@pytest.mark.parametrize("engine", ["digits_engine", "text_digits_engine"])
def test_output_types_return_the_same_generation_trimmed(request, engine, tmp_path):
    """output_type as diffusers': "float" is the default run without its 8-bit images, "latent" its latents
    alone (text-digits: before the DC-AE decoder); one seed gives the same latents whatever is returned."""
    with Pipeline.load(request.getfixturevalue(engine)) as pipe:
        ask = {"prompt": "a 7"} if pipe.manifest.conditioning == "text" else {"class_label": 7}
        full, flt, lat = (
            pipe(**ask, seed=3, steps=3, batch_size=2, output_type=kind)
            for kind in ("uint8", "float", "latent")
        )
    assert len(full.images) == 2 and full.images[0].dtype == np.uint8 and full.pixels.dtype == np.float32
    assert flt.images is None and np.array_equal(flt.pixels, full.pixels)
    assert lat.images is None and lat.pixels is None and np.array_equal(lat.latents, full.latents)
    assert full.seeds == flt.seeds == lat.seeds == [3, 4]
    assert full.parameters == flt.parameters == lat.parameters
    for result in (flt, lat):
        with pytest.raises(InputError, match="holds no 8-bit images to save"):
            result.save(tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_previews_are_the_steps_x0_and_stopping_ends_the_loop(text_digits_engine):
    """on_preview gets each chosen step's x0 as unpacked latents; decode turns the last one into the result's
    pixels (flow Euler's last step lands on x0). An exception from a callback stops the loop at that step."""
    with Pipeline.load(text_digits_engine) as pipe:
        previews = {}
        r = pipe(
            prompt="seven",
            seed=3,
            steps=5,
            batch_size=2,
            sampler="FlowMatchEulerDiscreteScheduler",
            on_preview=lambda i, x0: previews.setdefault(i, x0),
            preview_steps=[2, 5],
        )
        assert sorted(previews) == [2, 5] and previews[5].shape == r.latents.shape
        np.testing.assert_allclose(previews[5], r.latents, atol=1e-5)
        assert not np.allclose(previews[2], previews[5], atol=1e-2)  # a preview is of its own step
        np.testing.assert_allclose(pipe.decode(previews[5]), r.pixels, atol=1e-5)

        steps_run = []

        def stop(i, n):
            steps_run.append(i)
            if i == 3:
                raise KeyboardInterrupt  # e.g. a server whose client went away

        with pytest.raises(KeyboardInterrupt):
            pipe(prompt="seven", steps=20, on_step=stop)
        assert steps_run == [1, 2, 3]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(on_preview=print, preview_steps=[0]), "preview step 0 is not allowed; use an integer in 1..4"),
        (dict(on_preview=print, preview_steps=[5]), "preview step 5 is not allowed"),
        (dict(on_preview=print, preview_steps=3), "preview_steps 3 is not a collection"),
        (dict(on_preview="x", preview_steps=[1]), "on_preview 'x' is not callable"),
    ],
)
def test_bad_preview_requests(pipe, kwargs, match):
    with pytest.raises(InputError, match=match):
        pipe(class_label=1, steps=4, **kwargs)
    with pytest.raises(InputError, match="latents of shape"):
        pipe.decode(np.zeros((1, 2, 16, 16), np.float32))
