"""Weights exactly as the folder holds them: text encoders in fp32 whatever their config.json's dtype says, and
diffusers' weight variants (`variant="fp16"`: `*.fp16.safetensors`, sharded indexes in every spelling seen)."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import one_line_error, run_cli_here
from tiny_components import randomize, t5_model, t5_tokenizer

from ditrt.export import export_model
from ditrt.export.loaders.diffusers import load_component
from ditrt.runtime import LoaderError
from ditrt.runtime.manifest import load_manifest

PROMPT = "a photo of a cat sitting on a red sofa"


def pixart_pipeline(half: bool = False):
    """A tiny PixArt-Σ pipeline (T5, transformer, VAE), seeded; half=True holds fp16 weights, as variant files do."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )

    tokenizer = t5_tokenizer()
    text_encoder = randomize(t5_model(tokenizer), seed=1)
    transformer = randomize(
        PixArtTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=1,
            cross_attention_dim=16,
            caption_channels=32,
            sample_size=4,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            use_additional_conditions=False,
        ),
        seed=2,
    )
    vae = randomize(
        AutoencoderKL(
            block_out_channels=(8,),
            layers_per_block=1,
            norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",),
        ),
        3,
    )
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(beta_schedule="linear"),
    )
    return pipe.to(torch.float16) if half else pipe


def text_engine_output(engine, tokenizer) -> np.ndarray:
    """prompt_embeds of the exported text engine for PROMPT (ids and mask as PixArtSigmaPipeline makes them)."""
    m = load_manifest(engine)
    ids = tokenizer(
        PROMPT,
        padding="max_length",
        max_length=m.text[0].max_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="np",
    )
    session = ort.InferenceSession(str(engine / m.components["text_encoder"].file))
    return session.run(
        ["prompt_embeds"],
        {"input_ids": ids.input_ids.astype(np.int64), "attention_mask": ids.attention_mask.astype(np.int64)},
    )[0]


def t5_reference(model, tokenizer, length: int) -> np.ndarray:
    ids = tokenizer(PROMPT, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state.float().numpy()


@pytest.mark.parametrize("key", [pytest.param("torch_dtype", marks=pytest.mark.slow), "dtype"])  # the Hub's
# older configs (slow: one export each, and both keys take the same path), and transformers 5's
def test_text_encoder_is_fp32_whatever_its_config_says(tmp_path, key):
    from transformers import T5EncoderModel

    ref = pixart_pipeline()
    ref.save_pretrained(tmp_path / "pixart")
    config = tmp_path / "pixart" / "text_encoder" / "config.json"
    d = {k: v for k, v in json.loads(config.read_text()).items() if k not in ("dtype", "torch_dtype")}
    config.write_text(json.dumps(dict(d, **{key: "float16"})))  # fp32 weights under a float16 config
    rounded = T5EncoderModel.from_pretrained(tmp_path / "pixart" / "text_encoder")
    assert rounded.dtype == torch.float16  # the trap: transformers' default dtype="auto" follows the config

    m = export_model(str(tmp_path / "pixart"), tmp_path / "engine")
    assert m.components["text_encoder"].precision == "fp32"
    got = text_engine_output(tmp_path / "engine", ref.tokenizer)
    want = t5_reference(ref.text_encoder, ref.tokenizer, got.shape[1])
    # fp32 end to end: ONNX Runtime vs torch kernels, rounding only (measured 4.5e-8 on |states| ≤ 0.4); the encoder
    # rounded to fp16 is 1.9e-4 away, so this bound tells them apart
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.abs(t5_reference(rounded.float(), ref.tokenizer, got.shape[1]) - want).max() > 1e-4


def test_folder_of_fp16_variant_files_is_found_and_noted(tmp_path):
    from transformers import T5EncoderModel

    pipe = pixart_pipeline(half=True)
    pipe.save_pretrained(tmp_path / "pixart", variant="fp16")
    files = sorted(p.name for p in (tmp_path / "pixart" / "transformer").iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
    m = export_model(str(tmp_path / "pixart"), tmp_path / "engine")
    assert m.export["variant"] is None
    found = (
        ("transformer", "diffusion_pytorch_model.fp16.safetensors"),
        ("text_encoder", "model.fp16.safetensors"),
        ("vae", "diffusion_pytorch_model.fp16.safetensors"),
    )
    assert [n for n in m.export["notes"] if "variant" in n] == [
        f"{c}: no plain weights, loaded the only variant, 'fp16' ({f})" for c, f in found
    ]
    assert {c.precision for c in m.components.values()} == {"fp32"}  # fp16 files, upcast: an fp32 engine
    want_model = T5EncoderModel.from_pretrained(
        tmp_path / "pixart" / "text_encoder", variant="fp16", dtype=torch.float32
    )
    got = text_engine_output(tmp_path / "engine", pipe.tokenizer)
    np.testing.assert_allclose(got, t5_reference(want_model, pipe.tokenizer, got.shape[1]), rtol=0, atol=1e-5)


def test_cli_variant_chooses_among_several_and_refuses_to_guess(tmp_path):
    root = tmp_path / "pixart"
    pixart_pipeline(half=True).save_pretrained(root, variant="fp16")
    pixart_pipeline().transformer.save_pretrained(root / "transformer", variant="ema")  # a second variant
    vae = root / "vae"
    (vae / "diffusion_pytorch_model.fp16.safetensors").rename(vae / "diffusion_pytorch_model.safetensors")

    r = run_cli_here("dit-export", str(root), "-o", str(tmp_path / "e"))
    one_line_error(
        r,
        f"{str(root / 'transformer')!r} has no plain (non-variant) safetensors weights; found "
        "diffusion_pytorch_model.ema.safetensors, diffusion_pytorch_model.fp16.safetensors: pass "
        "--variant ema or --variant fp16",
    )
    r = run_cli_here("dit-export", str(root), "--variant", "bf16", "-o", str(tmp_path / "e"))
    one_line_error(
        r,
        "has no 'bf16' variant safetensors weights; found diffusion_pytorch_model.ema.safetensors, "
        "diffusion_pytorch_model.fp16.safetensors: pass --variant ema or --variant fp16",
    )
    assert not (tmp_path / "e").exists()

    r = run_cli_here("dit-export", str(root), "--variant", "fp16", "-o", str(tmp_path / "e"))
    assert r.returncode == 0, r.stderr
    m = load_manifest(tmp_path / "e")
    assert m.export["variant"] == "fp16" and "--variant fp16" in m.export["command"]
    assert [n for n in m.export["notes"] if "variant" in n] == [
        "vae: no 'fp16' variant, loaded diffusion_pytorch_model.safetensors"
    ]

    r = run_cli_here("dit-export", "digits", "--variant", "fp16", "-o", str(tmp_path / "d"))
    one_line_error(r, "--variant fp16 applies to diffusers folders, not to the built-in model 'digits'")


@pytest.mark.parametrize(
    "index",
    [
        "diffusion_pytorch_model.safetensors.index.fp16.json",  # diffusers and transformers save_pretrained
        "diffusion_pytorch_model.safetensors.fp16.index.json",  # older diffusers
        "diffusion_pytorch_model.fp16.safetensors.index.json",  # seen on the Hub
    ],
)
def test_sharded_variant_loads_as_diffusers_loads_it(tmp_path, index):
    import copy

    from diffusers import DiTTransformer2DModel

    ref = randomize(
        DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=1,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=10,
        )
    )
    with torch.no_grad():  # the fp32 reference holds exactly the fp16 values
        for p in ref.parameters():
            p.copy_(p.half().float())
    copy.deepcopy(ref).half().save_pretrained(tmp_path, variant="fp16", max_shard_size="20KB")
    (tmp_path / "diffusion_pytorch_model.safetensors.index.fp16.json").rename(tmp_path / index)
    assert len(list(tmp_path.glob("diffusion_pytorch_model.fp16-*-of-*.safetensors"))) > 1
    notes = []
    ours = load_component(tmp_path, notes=notes)
    assert notes == [f"{tmp_path.name}: no plain weights, loaded the only variant, 'fp16' ({index})"]
    asked = load_component(tmp_path, "fp16", notes)
    assert len(notes) == 1  # asked for and found: nothing to note
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        want = ref(x, timestep=t, class_labels=y).sample
        for got in (ours(x, t.float(), y), asked(x, t.float(), y)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # measured 0


def test_variant_errors_name_what_was_found(tmp_path):
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, num_layers=1, sample_size=8, num_embeds_ada_norm=10
    )
    model.save_pretrained(tmp_path, variant="fp16")
    with pytest.raises(
        LoaderError,
        match=r"has no 'bf16' variant safetensors weights; found "
        r"diffusion_pytorch_model.fp16.safetensors: pass --variant fp16$",
    ):
        load_component(tmp_path, "bf16")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").unlink()
    with pytest.raises(
        LoaderError,
        match=r"has no safetensors weights \(looked for diffusion_pytorch_model / model"
        r"\[.VARIANT\].safetensors and their index files\); found only "
        r"diffusion_pytorch_model-00001-of-",
    ):
        load_component(tmp_path / "sharded")
