"""The embeddable generator: load an engine folder once, generate many times, from any thread.

pipe = Pipeline.load("engines/digits")
result = pipe(class_label=7, seed=0)
result.save("seven.png")
"""

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection

import numpy as np

from .backends import BACKENDS, open_backend
from .errors import ConfigError, InputError, ManifestError
from .manifest import Manifest, load_manifest, resolve_inside
from .outputs import as_path, output_paths, write_pngs
from .schedules import SAMPLERS, STEP_SCALARS, check_config, label, make_plan, prediction_of, switch
from .tokenizer import TextTokenizer, TokenizerConfig, check_text

MAX_BATCH = 64
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0  # as ComfyUI; far past where any model gives usable images
SHIFTS = (1e-3, 1e3)  # flow shifts in use are 1..~12; far outside this range the schedules degenerate
MAX_THREADS = 1024
BRANCH_AXIS = "n"  # CFG branches of the step engine's paired inputs: [negative; positive], or [positive]
OUTPUT_TYPES = ("uint8", "float", "latent")  # what a request returns: see Pipeline.__call__


@dataclass(frozen=True)
class Result:
    images: list[np.ndarray] | None  # uint8, (H, W) for one channel, (H, W, 3) for RGB; None unless "uint8"
    pixels: np.ndarray | None  # the same as float32 (B, H, W, C) in [0, 1]; None for output_type "latent"
    seeds: list[int]  # image i was generated from seeds[i]
    parameters: list[str]  # A1111-style generation parameters, one per image
    timings_ms: dict[str, float]
    warnings: tuple[str, ...] = ()  # e.g. a prompt truncated to the text encoder's limit
    # the sampler's final latents, float32 (B, C, H, W) unpacked, as the VAE decoder takes them (diffusers'
    # output_type="latent"); for models without a VAE, the pixels in [-1, 1] before scaling
    latents: np.ndarray | None = None

    def save(self, path: str | os.PathLike, overwrite: bool = False, metadata: bool = True) -> list[Path]:
        """Write the images as PNG: `path` for one image, `stem-0000.png`, `stem-0001.png`, ... for several.

        Each image goes to a new temporary file first, so no half-written PNG is ever left behind. Without
        overwrite an existing file is never replaced, even one that appears while this runs; if one output
        cannot be written, the others this call created are removed again (see outputs.py).
        """
        if self.images is None:
            raise InputError(
                "this result holds no 8-bit images to save (output_type 'float' or 'latent'); "
                "generate with output_type='uint8', the default"
            )
        paths = output_paths(path, len(self.images), overwrite)
        write_pngs(self.images, [p if metadata else None for p in self.parameters], paths, overwrite)
        return paths


class Pipeline:
    """A loaded engine folder. Immutable after load; each call keeps its state local, so calls may overlap."""

    def __init__(self, folder: Path, manifest: Manifest, engines: dict, tokenizers: list, load_ms: float):
        self.folder, self.manifest, self.engines, self.load_ms = folder, manifest, engines, load_ms
        self.tokenizers = tokenizers

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike,
        backend: str = "onnxruntime",
        verify: bool = True,
        threads: int | None = None,
    ) -> "Pipeline":
        """Check the folder (schema, paths, sizes, sha256 when verify) and open every component's engine."""
        start = time.perf_counter()
        folder = as_path("engine folder", folder)
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise InputError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        if not isinstance(verify, (bool, np.bool_)):
            raise InputError(f"verify {verify!r} is not allowed; use True or False")
        threads = None if threads is None else _int("threads", threads, 1, MAX_THREADS)
        manifest = load_manifest(folder, verify=bool(verify))
        if manifest.conditioning != "class" and not (manifest.text and "text_encoder" in manifest.components):
            raise ManifestError(
                f"{str(folder)!r} holds only the denoiser of the text-conditioned model "
                f"{manifest.model!r}; generating from it needs text encoders and a VAE decoder, "
                "which this version does not export yet"
            )
        if manifest.latent.channels not in (1, 3) and "vae_decoder" not in manifest.components:
            raise ManifestError(
                f"{str(folder)!r} has {manifest.latent.channels}-channel latents and no decoder "
                "component, so its latents cannot become an image"
            )
        try:
            config = check_config(manifest.scheduler.config, manifest.scheduler.call)
        except ConfigError as e:
            raise ManifestError(f"the folder's scheduler cannot be run by this runtime: {e}") from None
        if manifest.scheduler.prediction != prediction_of(config):
            raise ManifestError(
                f"manifest scheduler.prediction {manifest.scheduler.prediction!r} contradicts its "
                f"config ({prediction_of(config)!r}); re-export the folder"
            )
        branched = any(s.shape[:1] == [BRANCH_AXIS] for s in manifest.components["denoiser"].inputs)
        if manifest.conditioning == "class" and branched and manifest.null_class is None:
            raise ManifestError(
                f"{str(folder)!r} is class-conditional with classifier-free guidance but its manifest "
                "names no null_class; re-export the folder"
            )
        engines = {
            name: open_backend(backend, resolve_inside(folder, c.file), c, threads)
            for name, c in manifest.components.items()
        }
        tokenizers = [
            TextTokenizer(
                resolve_inside(folder, t.tokenizer), TokenizerConfig(t.max_length, t.pad_id, t.padding_side)
            )
            for t in manifest.text
        ]
        return cls(folder, manifest, engines, tokenizers, (time.perf_counter() - start) * 1e3)

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(
        self,
        *,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        class_label: int | str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        batch_size: int = 1,
        width: int | None = None,
        height: int | None = None,
        sampler: str | None = None,
        shift: float | None = None,
        latents: np.ndarray | None = None,
        max_sequence_length: int | None = None,
        on_step: Callable[[int, int], None] | None = None,
        output_type: str = "uint8",
        on_preview: Callable[[int, np.ndarray], None] | None = None,
        preview_steps: Collection[int] = (),
    ) -> Result:
        """Generate `batch_size` images of `prompt` (text models) or `class_label` (class-conditional models).

        Image i uses seed + i; seed None or < 0 picks one. Steps and guidance default to the manifest's.
        `sampler` (see `samplers`) and `shift` switch the scheduler as diffusers' `X.from_config(config)` would.
        `latents` (B, C, H, W) float32 replaces the seeded initial noise, as diffusers' `latents=` argument does.
        `max_sequence_length`: T5 tokens for SD3/Flux folders, within the manifest's range (default: the pipeline's).
        Classifier-free guidance runs where the diffusers pipeline runs it (guidance > 1); at guidance <= 1 only
        the conditional branch is computed.
        `output_type` as diffusers': "uint8" (default); "float": no 8-bit images; "latent": no decode either.
        `on_step(step, steps)` is called after every step (no data: the loop does not wait for the device);
        `on_preview(step, x0)` after each step in `preview_steps` (1..steps) with that step's x0 prediction as
        unpacked float32 latents (B, C, H, W), which `decode` turns into pixels. An exception from either stops
        the generation there (e.g. a client that has gone).
        """
        m = self.manifest
        size, steps, batch_size, guidance, config, plan = self._numbers(
            steps, guidance, batch_size, width, height, sampler, shift
        )
        if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
            raise InputError(f"output_type {_show(output_type)} is not allowed; use uint8, float or latent")
        preview = self._callbacks(on_step, on_preview, preview_steps, steps)
        seed = _seed(seed, batch_size)
        shape = (m.latent.channels, m.latent.height, m.latent.width)
        _check_latents(latents, batch_size, shape)
        timings = {"load": self.load_ms}

        t0 = time.perf_counter()
        lengths = self._text_lengths(max_sequence_length)
        cond, description, warnings = self._conditioning(
            prompt, negative_prompt, class_label, batch_size, cfg=guidance > 1, lengths=lengths
        )
        t1 = time.perf_counter()
        seeds = [seed + i for i in range(batch_size)]
        why = f"guidance {guidance:g}, {steps} steps, sampler {label(config)}"
        with np.errstate(all="ignore"):  # overflow becomes the non-finite values refused below, not a warning
            x = initial_noise(seeds, shape) if latents is None else latents.copy()
            x = self._denoise(pack(x, m.latent.packing), cond, guidance, plan, on_step, preview, timings)
            _check_finite(x, "the denoiser", why, latents is not None)
            t2 = time.perf_counter()
            final = unpack(x, m.latent.packing, m.latent.height, m.latent.width)
            pixels = None if output_type == "latent" else self._decode(final, size)
            _check_finite(pixels, "the VAE decoder (from finite latents)", why, latents is not None)
            images = to_uint8(pixels) if output_type == "uint8" else None
        t3 = time.perf_counter()
        if m.random_weights:  # nothing else at run time would say so
            warnings = [
                f"model {m.model!r} has random weights (exported with --random-weights): its images are "
                "noise, for benchmarking only",
                *warnings,
            ]
        timings.update(
            text_encode=(t1 - t0) * 1e3,
            denoise_total=(t2 - t1) * 1e3,
            denoise_per_step=(t2 - t1) * 1e3 / steps,
            decode=(t3 - t2) * 1e3,
            total=(t3 - t0) * 1e3,
        )
        params = [self._parameters(description, steps, guidance, s, size, config) for s in seeds]
        return Result(images, pixels, seeds, params, timings, tuple(warnings), final)

    def check(
        self,
        *,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        class_label: int | str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        batch_size: int = 1,
        width: int | None = None,
        height: int | None = None,
        sampler: str | None = None,
        shift: float | None = None,
        max_sequence_length: int | None = None,
    ) -> None:
        """Raise the InputError that __call__ would raise for these arguments, without generating anything (a
        prompt is checked, not encoded): a service answers a request it cannot run before queueing it."""
        _, _, batch_size, *_ = self._numbers(steps, guidance, batch_size, width, height, sampler, shift)
        _seed(seed, batch_size)
        self._text_lengths(max_sequence_length)
        self._condition(prompt, negative_prompt, class_label)

    def _numbers(self, steps, guidance, batch_size, width, height, sampler, shift):
        """A request's numbers checked -> (size, steps, batch_size, guidance, scheduler config, step plan); as
        Python int/float from here on (numpy scalars accepted, bools refused)."""
        sched = self.manifest.scheduler
        size = self._output_size(width, height)
        steps = _int("steps", sched.default_steps if steps is None else steps, 1, MAX_STEPS)
        batch_size = _int("batch_size", batch_size, 1, MAX_BATCH)
        guidance = _real(
            "guidance", sched.default_guidance if guidance is None else guidance, 0, MAX_GUIDANCE
        )
        config = self.scheduler_config(sampler, shift)
        try:
            plan = make_plan(config, steps, sched.call)
        except ConfigError as e:  # e.g. a schedule that divides by zero at this step count
            raise InputError(str(e)) from None
        return size, steps, batch_size, guidance, config, plan

    @property
    def samplers(self) -> list[str]:
        """Sampler names `sampler=` accepts for this model (its prediction type decides which apply)."""
        out = []
        for name in SAMPLERS:
            try:
                self.scheduler_config(name)
                out.append(name)
            except InputError:
                pass
        return out

    def scheduler_config(self, sampler: str | None = None, shift: float | None = None) -> dict:
        """The diffusers scheduler config a request runs: the folder's, or switched to `sampler` / `shift`."""
        sched = self.manifest.scheduler
        if sampler is None and shift is None:
            return sched.config
        if sampler is not None and not isinstance(sampler, str):
            raise InputError(f"sampler {_show(sampler)} is not allowed; give a name: {', '.join(SAMPLERS)}")
        if shift is not None:
            shift = _real("shift", shift, *SHIFTS)
        try:
            config = switch(
                sched.config,
                sched.config["_class_name"] if sampler is None else sampler,
                sched.prediction,
                shift,
            )
            return check_config(config, sched.call)
        except ConfigError as e:
            raise InputError(str(e)) from None

    def _conditioning(
        self, prompt, negative_prompt, class_label, batch: int, cfg: bool, lengths: list[int]
    ) -> tuple[dict, str, list[str]]:
        """Per-request denoiser inputs (computed once, not per step), the prompt line for PNGs, warnings.

        Inputs with a leading CFG branch axis get [negative; positive] when cfg, else [positive] alone."""
        m = self.manifest
        checked = self._condition(prompt, negative_prompt, class_label)
        if m.conditioning == "class":
            label_ = checked
            pos = {"class_labels": np.full((batch,), label_, dtype=np.int64)}
            neg = {
                "class_labels": np.full((batch,), m.null_class if m.null_class is not None else -1, np.int64)
            }
            description, warnings = f"class {label_} ({m.class_names[label_]})", []
        else:
            prompt, negative_prompt = checked
            (pos, warnings), (neg, _) = (
                self._encode_text(prompt, lengths),
                self._encode_text(negative_prompt, lengths, negative=True),
            )
            pos = {k: np.repeat(v, batch, axis=0) for k, v in pos.items()}
            neg = {k: np.repeat(v, batch, axis=0) for k, v in neg.items()}
            description = prompt + (f"\nNegative prompt: {negative_prompt}" if negative_prompt else "")
        feeds = {}
        for spec in m.components["denoiser"].inputs:
            if spec.shape[:1] == [BRANCH_AXIS]:
                feeds[spec.name] = np.stack([neg[spec.name], pos[spec.name]] if cfg else [pos[spec.name]])
            elif spec.name in pos:  # Flux: the prompt alone, guidance is embedded in the model
                feeds[spec.name] = pos[spec.name]
        return feeds, description, warnings

    def _condition(self, prompt, negative_prompt, class_label) -> int | tuple[str, str]:
        """The conditioning arguments checked -> the class index, or (prompt, negative prompt)."""
        m = self.manifest
        if m.conditioning == "class":
            if prompt is not None or negative_prompt is not None:
                raise InputError(
                    f"model {m.model!r} is class-conditional: give a class label, not a prompt "
                    f"({'prompt' if prompt is not None else 'negative_prompt'} was given)"
                )
            return self._class_index(class_label)
        if class_label is not None:
            raise InputError(f"model {m.model!r} is text-conditioned: give a prompt, not a class label")
        if prompt is None:
            raise InputError(f"model {m.model!r} needs a prompt (a string)")
        prompt = check_text("prompt", prompt)
        return prompt, "" if negative_prompt is None else check_text("negative_prompt", negative_prompt)

    def _text_lengths(self, max_sequence_length: int | None) -> list[int]:
        """Tokens per text encoder for this request: the manifest's, or max_sequence_length where it may vary."""
        specs = self.manifest.text
        ranged = [t for t in specs if t.length_range]
        if max_sequence_length is None:
            return [t.max_length for t in specs]
        if not ranged:
            fixed = ", ".join(str(t.max_length) for t in specs) or "none (no text encoder)"
            raise InputError(
                f"max_sequence_length {_show(max_sequence_length)} cannot be chosen for this engine "
                f"folder; its text lengths are fixed ({fixed})"
            )
        lo, hi = ranged[0].length_range
        max_sequence_length = _int("max_sequence_length", max_sequence_length, lo, hi)
        return [max_sequence_length if t.length_range else t.max_length for t in specs]

    def _encode_text(
        self, text: str, lengths: list[int], negative: bool = False
    ) -> tuple[dict[str, np.ndarray], list[str]]:
        feeds, warnings, keep = {}, [], None
        for spec, tokenizer, length in zip(self.manifest.text, self.tokenizers, lengths):
            text = text.lower().strip() if spec.lowercase else text
            if (
                spec.prefix and not negative
            ):  # Sana: instruction + prompt, then BOS + the last max_length−1 tokens
                tokens = tokenizer(spec.prefix + text, max_length=spec.prefixed_max_length)
                keep = [0, *range(spec.prefixed_max_length - spec.max_length + 1, spec.prefixed_max_length)]
            else:
                tokens = tokenizer(text, max_length=length)
            if tokens.truncated[0]:
                warnings.append(f"prompt truncated to the text encoder's limit of {length} tokens")
            feeds[spec.input_ids] = tokens.input_ids
            if spec.attention_mask:
                feeds[spec.attention_mask] = tokens.attention_mask
        out = self.engines["text_encoder"].run(feeds)
        return ({k: v[:, keep] for k, v in out.items()} if keep else out), warnings

    def _denoise(
        self,
        x: np.ndarray,
        cond: dict[str, np.ndarray],
        guidance: float,
        plan: dict[str, np.ndarray],
        on_step: Callable[[int, int], None] | None,
        preview: tuple[set[int], Callable[[int, np.ndarray], None]] | None,
        timings: dict,
    ) -> np.ndarray:
        """The sampler loop on the step engine's device: the conditioning bound once, per step the scalars in
        (see schedules.py), the state carried on the device; one read at the end."""
        steps = len(plan["t"])
        x = x * plan["init"]  # 1, or EulerDiscreteScheduler's initial scale (see schedules._euler)
        per_step = [{k: np.asarray(plan[k][i], dtype=np.float32) for k in STEP_SCALARS} for i in range(steps)]
        zeros = np.zeros_like(x)
        static = {"guidance": np.asarray(guidance, np.float32), **cond}
        start = time.perf_counter()
        with self.engines["denoiser"].loop(static, {"x": x, "x0_prev": zeros, "x0_prev2": zeros}) as loop:
            for i, scalars in enumerate(per_step):
                loop.step(scalars)
                if on_step is not None:
                    on_step(i + 1, steps)
                if preview is not None and i + 1 in preview[0]:
                    preview[1](i + 1, loop.read()["x0_prev"])
            state = loop.read()
        timings["denoise_engine"] = (time.perf_counter() - start) * 1e3
        return state["x0_prev"] if plan["final_from_x0"] else state["x"] * plan["final"]

    def _callbacks(self, on_step, on_preview, preview_steps, steps: int):
        """Check the callbacks -> (steps to preview, callback of packed x0) for _denoise, or None."""
        if on_step is not None and not callable(on_step):
            raise InputError(
                f"on_step {_show(on_step)} is not callable; give a function f(step, steps) or None"
            )
        if on_preview is None:
            return None
        if not callable(on_preview):
            raise InputError(
                f"on_preview {_show(on_preview)} is not callable; give a function f(step, x0) or None"
            )
        try:
            chosen = {_int("preview step", i, 1, steps) for i in preview_steps}
        except TypeError:
            raise InputError(
                f"preview_steps {_show(preview_steps)} is not a collection of step numbers"
            ) from None
        lat = self.manifest.latent
        return chosen, lambda i, x0: on_preview(i, unpack(x0, lat.packing, lat.height, lat.width))

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Unpacked float32 latents (B, C, H, W), e.g. an on_preview x0 -> float32 pixels (B, H, W, C) in [0, 1]
        at the engines' size: the VAE decoder, or the latents themselves for a model without one."""
        lat = self.manifest.latent
        _check_latents(
            latents,
            len(latents) if isinstance(latents, np.ndarray) else 1,
            (lat.channels, lat.height, lat.width),
        )
        if len(latents) > MAX_BATCH:
            raise InputError(f"latents of batch {len(latents)} are not allowed; decode at most {MAX_BATCH}")
        return self._decode(latents, self.image_size)

    def _decode(self, x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Final (unpacked) latents -> float32 images (B, H, W, C) in [0, 1] of `size`: the VAE engine, or
        latents that are pixels in [-1, 1]; then PixArt's resize and crop to a `size` not the engines' own."""
        if "vae_decoder" in self.engines:
            x = self.engines["vae_decoder"].run({"latents": x})["image"]
        else:
            lat = self.manifest.latent
            x = np.clip((x / lat.scaling_factor + lat.shift_factor + 1) / 2, 0, 1)
        x = x if size == self.image_size else resize_and_crop(x, *size)
        return x.transpose(0, 2, 3, 1).astype(np.float32, copy=False)

    def _output_size(self, width: int | None, height: int | None) -> tuple[int, int]:
        """(width, height) to return: the engines' size, or a size that PixArt's resolution bins map to it."""
        w, h = self.image_size
        width = w if width is None else _int("width", width, 1, 16384)
        height = h if height is None else _int("height", height, 1, 16384)
        if (width, height) == (w, h):
            return w, h
        bins = self.manifest.resolution_bins
        if bins:  # PixArtImageProcessor.classify_height_width_bin
            ratio = min(bins, key=lambda r: abs(float(r) - height / width))
            if tuple(bins[ratio]) == (h, w):
                return width, height
        also = f" (and sizes whose resolution bin is {w}x{h})" if bins else ""
        raise InputError(
            f"size {width}x{height} is not available: this engine folder generates {w}x{h} images{also}; "
            "export another with dit-export --width/--height"
        )

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the generated images."""
        if "vae_decoder" in self.manifest.components:
            *_, h, w = self.manifest.components["vae_decoder"].outputs[0].shape
            return w, h
        return self.manifest.latent.width, self.manifest.latent.height

    def _class_index(self, class_label: int | str | None) -> int:
        names = self.manifest.class_names
        if self.manifest.conditioning != "class":
            raise InputError(f"model {self.manifest.model!r} is not class-conditional")
        if class_label is None:
            raise InputError(f"model {self.manifest.model!r} needs a class label: 0..{len(names) - 1}")
        if isinstance(class_label, str) and class_label in names:
            return names.index(class_label)
        integer = isinstance(class_label, (int, np.integer)) and not isinstance(class_label, (bool, np.bool_))
        if integer and 0 <= class_label < len(names):
            return int(class_label)
        what = (
            "is out of range"
            if integer or isinstance(class_label, str)
            else "is not an integer or a class name"
        )
        also = (
            "" if names == [str(i) for i in range(len(names))] else f" (or a class name such as {names[0]!r})"
        )
        raise InputError(
            f"class label {_show(class_label)} {what}; model {self.manifest.model!r} "
            f"has classes 0..{len(names) - 1}{also}"
        )

    def _parameters(
        self, description: str, steps: int, guidance: float, seed: int, size: tuple[int, int], config: dict
    ) -> str:
        return (
            f"{description}\n"
            f"Steps: {steps}, Sampler: {label(config)}, "
            f"CFG scale: {guidance:g}, Seed: {seed}, Size: {size[0]}x{size[1]}, Model: {self.manifest.model}"
        )


def _check_latents(latents: np.ndarray | None, batch: int, shape: tuple[int, ...]) -> None:
    """Caller-given initial noise: float32 (batch, C, H, W) in the unpacked latent layout, finite."""
    if latents is None:
        return
    if not isinstance(latents, np.ndarray) or latents.dtype != np.float32 or latents.shape != (batch, *shape):
        got = (
            f"shape {latents.shape} and dtype {latents.dtype}"
            if isinstance(latents, np.ndarray)
            else type(latents).__name__
        )
        raise InputError(
            f"latents of {got} are not allowed; give a float32 array of shape "
            f"({batch}, {', '.join(map(str, shape))})"
        )
    if not np.isfinite(latents).all():
        raise InputError("latents hold non-finite values (NaN or inf); give finite initial noise")


def _check_finite(x: np.ndarray | None, stage: str, why: str, latents_given: bool) -> None:
    if x is not None and not np.isfinite(x).all():
        also = " (or give initial latents of ordinary magnitude)" if latents_given else ""
        raise InputError(
            f"{stage} produced non-finite values ({why}); lower the guidance or change the sampler{also}"
        )


def _show(value) -> str:
    """A value as a message shows it: numpy scalars as the number they hold, long values cut."""
    return repr(value.item() if isinstance(value, np.generic) else value)[:60]


def _int(name: str, value, lo: int, hi: int) -> int:
    """An integer parameter (Python or numpy; a bool is not one) within lo..hi, as a Python int."""
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, (int, np.integer))
        or not lo <= value <= hi
    ):
        raise InputError(f"{name} {_show(value)} is not allowed; use an integer in {lo}..{hi}")
    return int(value)


def _real(name: str, value, lo: float, hi: float) -> float:
    """A number (Python or numpy; not a bool) within lo..hi, as a Python float. The range check refuses NaN and
    infinities too, and compares huge ints exactly (float() of one would raise OverflowError)."""
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not lo <= value <= hi
    ):
        raise InputError(f"{name} {_show(value)} is not allowed; use a finite number in {lo:g}..{hi:g}")
    return float(value)


def _seed(seed, batch: int) -> int:
    """The first image's seed: as given, or a random one for None or a negative seed."""
    seed = None if seed is None else _int("seed", seed, -(2**63), 2**63 - 1 - batch)
    return secrets.randbelow(2**31) if seed is None or seed < 0 else seed


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal noise, one PCG64 stream per image, so image i depends only on seeds[i]."""
    return np.stack(
        [np.random.Generator(np.random.PCG64(s)).standard_normal(shape, dtype=np.float32) for s in seeds]
    )


def pack(x: np.ndarray, p: int) -> np.ndarray:
    """(B, C, H, W) -> (B, H/p·W/p, C·p·p): Flux's 2×2 latent packing (diffusers _pack_latents); p = 1: as is."""
    if p == 1:
        return x
    B, C, H, W = x.shape
    return (
        x.reshape(B, C, H // p, p, W // p, p)
        .transpose(0, 2, 4, 1, 3, 5)
        .reshape(B, (H // p) * (W // p), C * p * p)
    )


def unpack(x: np.ndarray, p: int, H: int, W: int) -> np.ndarray:
    if p == 1:
        return x
    B, _, D = x.shape
    C = D // (p * p)
    return x.reshape(B, H // p, W // p, C, p, p).transpose(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def to_uint8(x: np.ndarray) -> list[np.ndarray]:
    """(B, H, W, C) in [0, 1] -> list of uint8 images, (H, W) for C = 1 and (H, W, 3) for C = 3."""
    x = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
    return [img[..., 0] if img.shape[-1] == 1 else img for img in x]


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of torch's bilinear resize along one axis (align_corners=False, no antialias)."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1, frac = np.minimum(i0 + 1, n_in - 1), src - np.floor(src)
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), i0), 1 - frac)
    np.add.at(m, (np.arange(n_out), i1), frac)
    return m


def resize_and_crop(x: np.ndarray, width: int, height: int) -> np.ndarray:
    """PixArtImageProcessor.resize_and_crop_tensor in numpy: scale (B, C, H, W) to cover width x height, then
    crop the centre."""
    h, w = x.shape[-2:]
    ratio = max(height / h, width / w)
    rh, rw = int(h * ratio), int(w * ratio)
    y = _bilinear_matrix(h, rh) @ x.astype(np.float64) @ _bilinear_matrix(w, rw).T  # (B, C, rh, rw)
    top, left = (rh - height) // 2, (rw - width) // 2
    return y[:, :, top : top + height, left : left + width].astype(x.dtype)
