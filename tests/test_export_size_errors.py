"""Size limits reach the user as one line in their own units: a model's limit on the latent grid (SD3's stored
position table, DiT's fixed one) in pixels for the folder's VAE factor and patch size, before the slow export; and
any project error raised inside model code while torch.export traces it surfaces as itself."""

import json

import pytest
from conftest import one_line_error, run_cli_here
from tiny_components import randomize
from torch import nn

from ditrt.export import export_model
from ditrt.export.models.mmdit import MMDiT, MMDiTConfig
from ditrt.export.onnx_export import export_onnx
from ditrt.runtime import DitError, InputError
from ditrt.runtime.manifest import TensorSpec


def pipeline_folder(root, transformer, pipeline_class: str):
    """A pipeline folder without text encoders: transformer, a VAE with spatial factor 2, the scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    randomize(transformer).save_pretrained(root / "transformer")
    randomize(
        AutoencoderKL(
            latent_channels=4,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
        ),
        seed=1,
    ).save_pretrained(root / "vae")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    return root


def test_sd3_position_table_limit_in_pixels(tmp_path):
    from diffusers import SD3Transformer2DModel

    root = pipeline_folder(
        tmp_path / "sd3",
        SD3Transformer2DModel(
            sample_size=4,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            caption_projection_dim=16,
            pooled_projection_dim=8,
            pos_embed_max_size=4,
        ),
        "StableDiffusion3Pipeline",
    )
    # the table covers 4 tokens × patch 2 = 8 latent rows, × VAE factor 2 = 16 px (not the factor 8 of SD3's VAE)
    r = run_cli_here("dit-export", str(root), "-H", "24", "-W", "16", "-o", str(tmp_path / "e"))
    one_line_error(
        r,
        "image 24x16 px is larger than this model's position table covers: at most 16 px per side "
        "(pos_embed_max_size=4 × patch_size=2 × VAE factor 2)",
    )
    assert not (tmp_path / "e").exists()
    m = export_model(str(root), tmp_path / "e", height=16, width=8)  # at the limit: exported
    assert (m.latent.height, m.latent.width) == (8, 4)


def test_dit_fixed_position_table_in_pixels(tmp_path):
    from diffusers import DiTTransformer2DModel

    root = pipeline_folder(
        tmp_path / "dit",
        DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=1,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=10,
        ),
        "DiTPipeline",
    )
    # same token count as 16x16 (4·16 = 8·8 latents): a table added by broadcasting would not have noticed
    with pytest.raises(
        InputError,
        match=r"^image 8x32 px is not allowed: this DiT's position table is fixed at "
        r"16x16 px \(sample_size=8 × VAE factor 2\)$",
    ):
        export_model(str(root), tmp_path / "e", height=8, width=32)
    assert not (tmp_path / "e").exists()


def test_project_errors_raised_while_tracing_surface_as_themselves(tmp_path):
    model = MMDiT(
        MMDiTConfig(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            hidden_size=16,
            depth=1,
            num_heads=2,
            joint_attention_dim=16,
            pooled_projection_dim=12,
            pos_embed_max_size=4,
        )
    )
    inputs = [
        TensorSpec("x", "float32", ("B", 4, 10, 10)),
        TensorSpec("t", "float32", ("B",)),
        TensorSpec("encoder_hidden_states", "float32", ("B", 3, 16)),
        TensorSpec("pooled_projections", "float32", ("B", 12)),
    ]
    outputs = [TensorSpec("out", "float32", ("B", 4, 10, 10))]
    # torch.export wraps it in a TorchExportError; the user gets the model's own one-line error (in latent units:
    # export_onnx knows no VAE)
    with pytest.raises(
        InputError,
        match=r"^latent 10x10 is larger than this model's position table covers: at most "
        r"8 per side \(pos_embed_max_size=4 × patch_size=2\)$",
    ):
        export_onnx(model, inputs, outputs, tmp_path / "m.onnx")

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("a bug, not a user error")

    with pytest.raises(Exception) as e:  # anything else is still reported as an internal error
        export_onnx(
            Broken(),
            [TensorSpec("x", "float32", ("B", 2))],
            [TensorSpec("y", "float32", ("B", 2))],
            tmp_path / "b.onnx",
        )
    assert not isinstance(e.value, DitError) and "a bug, not a user error" in repr(
        e.value.__cause__ or e.value
    )
    assert not (tmp_path / "m.onnx").exists()
