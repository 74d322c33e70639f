"""The shared test factories, in one place: test modules import these from here, never from each other.

- `randomize`: seeded random weights for any torch module (every weight counts, unlike diffusers' zero inits);
- tokenizers trained here on a few sentences (`clip_tokenizer`, `t5_tokenizer`, `gemma_tokenizer`; no
  downloads), tiny models (`t5_model`, `dc_ae_config`) and a tiny Flux pipeline folder (`build_flux`);
- diffusers' own test-suite dummy configurations, built here without the Hub (below).
Fixtures (engine folders exported once per session) live in conftest.py.

diffusers' dummy configurations:

Transformer configs are copied from diffusers' model tests (tests/models/transformers/test_models_*.py,
`prepare_init_args_and_inputs_for_common` / `get_init_dict`) and pipeline components from the pipeline tests
(tests/pipelines/<family>/test_*.py, `get_dummy_components`), with their schedulers and VAEs as written there.

Their Hub text encoders and tokenizers cannot be downloaded here, so they are built locally at the same tiny sizes:
- "hf-internal-testing/tiny-random-clip" tokenizer -> `clip_tokenizer` (our trained byte-level BPE, 77 tokens);
  the CLIP encoders themselves are written out in diffusers' tests (`CLIP` below, verbatim).
- "hf-internal-testing/tiny-random-t5" (model and tokenizer) -> `TINY_RANDOM_T5`: the Hub config.json as we know it
  (transformers' T5 model-tester sizes: d_model 32, d_kv 8, d_ff 37, 5 layers, 4 heads, 8 buckets, ReLU FFN,
  vocab 32100); it is not stored in the searchable corpus, so these are the remembered values, not re-read ones.
  Random weights (seed 0) instead of the Hub's, drawn with initializer_factor 1.0 rather than the tester's 0.002:
  at 0.002 the encoder's output hardly depends on the prompt (two different prompts moved PixArt's image by
  2.7e-4, under the 1e-3 parity bound), so a broken text path could not fail the tests. The tokenizer is our
  trained T5 Unigram.
- "hf-internal-testing/dummy-gemma" tokenizer -> `gemma_tokenizer`. diffusers' Sana test gives Gemma-2 `vocab_size=8`
  and only ever encodes "" (its own comment: any other prompt is an embedding-lookup error); we keep every other
  Gemma2Config value and use the tokenizer's vocabulary size so that real prompts (and Sana's instruction prefix)
  can be encoded.
"""

import json

import torch

PROMPT = "A photo of a CAT sitting on a red sofa "
# the tokenizers' training sentences
CORPUS = [
    "a photo of a cat sitting on a red sofa",
    "a painting of a dog on the beach at sunset",
    "an astronaut riding a horse on the moon",
    "a bowl of fruit, oil on canvas",
    "two cats and a dog",
] * 3


def randomize(model, seed: int = 0, buffers: bool | str = False):
    """N(0, 0.1²) values (seeded) in every parameter: diffusers zero-inits some layers, random values make
    every weight count. buffers=True: in every buffer too, after the parameters (SD3's stored position table);
    buffers="saved": in what save_pretrained writes instead (parameters and persistent buffers, in state_dict
    order; not the tables diffusers recomputes on load). Returns the model in eval mode."""
    if buffers == "saved":
        tensors = list(model.state_dict(keep_vars=True).values())
    else:
        tensors = [*model.parameters(), *(model.buffers() if buffers else ())]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model.eval()


def clip_tokenizer(**kw):
    """CLIP's byte-level BPE with `</w>` word ends; BOS/EOS last in the vocabulary, as CLIP's 49406, 49407."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                "removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=400, initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False
        ),
    )
    vocab = bpe.get_vocab()
    for c in alphabet:
        vocab.setdefault(c + "</w>", len(vocab))
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, **kw)


def t5_tokenizer():
    """T5's Unigram: <pad> 0, </s> 1, <unk> 2, pieces, then 100 <extra_id_*> added tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    uni = Tokenizer(models.Unigram())
    uni.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=100, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    uni.train_from_iterator(CORPUS, trainer)
    return T5Tokenizer(vocab=[tuple(v) for v in json.loads(uni.to_str())["model"]["vocab"]])


def gemma_tokenizer():
    """Gemma's BPE with byte fallback; adds <bos> and no <eos>, like gemma-2's tokenizer_config."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import GemmaTokenizer

    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    )
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    return GemmaTokenizer(vocab=bpe.get_vocab(), merges=merges, add_bos_token=True, add_eos_token=False)


def t5_model(tok):
    """A tiny T5 encoder (gated GELU, 2 layers) over `tok`'s vocabulary, at transformers' initialisation."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8,
    )
    return T5EncoderModel(config)


def dc_ae_config(upsample: str) -> dict:
    """A tiny AutoencoderDC: ResBlock and EfficientViT stages, factor 4, upsampling by `upsample`."""
    return dict(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=4,
        scaling_factor=0.41407,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16, 32),
        decoder_block_out_channels=(8, 16, 32),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 2, 1),
        encoder_qkv_multiscales=((), (), (5,)),
        decoder_qkv_multiscales=((), (3,), (3, 5)),
        upsample_block_type=upsample,
        downsample_block_type="pixel_unshuffle",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        decoder_conv_act_fn="relu",
    )


def build_flux(root, guidance_embeds: bool, dynamic: bool | None = None):
    """A tiny FluxPipeline (dev with guidance_embeds, else schnell) saved to `root`; returns the pipeline."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tok_l, tok_t5 = clip_tokenizer(model_max_length=77), t5_tokenizer()
    clip = randomize(
        CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tok_l),
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                bos_token_id=tok_l.bos_token_id,
                eos_token_id=tok_l.eos_token_id,
            )
        ),
        1,
    )
    t5 = randomize(
        T5EncoderModel(
            T5Config(
                vocab_size=len(tok_t5),
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
            )
        ),
        seed=2,
    )
    transformer = randomize(
        FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=16,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 6, 6),
        ),
        3,
    )
    vae = randomize(
        AutoencoderKL(
            latent_channels=16,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=0.3611,
            shift_factor=0.1159,
        ),
        seed=4,
    )
    dynamic = guidance_embeds if dynamic is None else dynamic  # FLUX.1-dev shifts by resolution, schnell not
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0 if guidance_embeds else 1.0, use_dynamic_shifting=dynamic
    )
    ref = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=tok_l,
        text_encoder_2=t5,
        tokenizer_2=tok_t5,
        transformer=transformer,
    )
    ref.save_pretrained(root)
    return ref


# ---- denoiser configs from diffusers' model tests ----
# tests/models/transformers/test_models_dit_transformer2d.py
DIT_MODEL = dict(
    in_channels=4,
    out_channels=8,
    activation_fn="gelu-approximate",
    num_attention_heads=2,
    attention_head_dim=4,
    attention_bias=True,
    num_layers=1,
    norm_type="ada_norm_zero",
    num_embeds_ada_norm=8,
    patch_size=2,
    sample_size=8,
)
# tests/models/transformers/test_models_pixart_transformer2d.py
PIXART_MODEL = dict(
    sample_size=8,
    num_layers=1,
    patch_size=2,
    attention_head_dim=2,
    num_attention_heads=2,
    in_channels=4,
    cross_attention_dim=8,
    out_channels=8,
    attention_bias=True,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=8,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    use_additional_conditions=False,
    caption_channels=None,
)
# tests/models/transformers/test_models_transformer_sana.py
SANA_MODEL = dict(
    patch_size=1,
    in_channels=4,
    out_channels=4,
    num_layers=1,
    attention_head_dim=4,
    num_attention_heads=2,
    num_cross_attention_heads=2,
    cross_attention_head_dim=4,
    cross_attention_dim=8,
    caption_channels=8,
    sample_size=32,
)
# tests/models/transformers/test_models_transformer_sd3.py (SD3TransformerTesterConfig, SD35TransformerTesterConfig)
SD3_MODEL = dict(
    sample_size=32,
    patch_size=1,
    in_channels=4,
    num_layers=4,
    attention_head_dim=8,
    num_attention_heads=4,
    caption_projection_dim=32,
    joint_attention_dim=32,
    pooled_projection_dim=64,
    out_channels=4,
    pos_embed_max_size=96,
    dual_attention_layers=(),
    qk_norm=None,
)
SD35_MODEL = dict(SD3_MODEL, dual_attention_layers=(0,), qk_norm="rms_norm")
# tests/models/transformers/test_models_transformer_flux.py
FLUX_MODEL = dict(
    patch_size=1,
    in_channels=4,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=[4, 4, 8],
)

# ---- transformer configs of the pipelines' get_dummy_components ----
# tests/pipelines/dit/test_dit.py (a Transformer2DModel, remapped by diffusers to DiTTransformer2DModel)
DIT_PIPE = dict(
    sample_size=16,
    num_layers=2,
    patch_size=4,
    attention_head_dim=8,
    num_attention_heads=2,
    in_channels=4,
    out_channels=8,
    attention_bias=True,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_zero",
    norm_elementwise_affine=False,
)
# tests/pipelines/pixart_alpha/test_pixart.py and tests/pipelines/pixart_sigma/test_pixart.py (identical)
PIXART_PIPE = dict(
    sample_size=8,
    num_layers=2,
    patch_size=2,
    attention_head_dim=8,
    num_attention_heads=3,
    caption_channels=32,
    in_channels=4,
    cross_attention_dim=24,
    out_channels=8,
    attention_bias=True,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
)
# tests/pipelines/sana/test_sana.py
SANA_PIPE = dict(
    patch_size=1,
    in_channels=4,
    out_channels=4,
    num_layers=1,
    num_attention_heads=2,
    attention_head_dim=4,
    num_cross_attention_heads=2,
    cross_attention_head_dim=4,
    cross_attention_dim=8,
    caption_channels=8,
    sample_size=32,
)
# tests/pipelines/stable_diffusion_3/test_pipeline_stable_diffusion_3.py
SD3_PIPE = dict(
    sample_size=32,
    patch_size=1,
    in_channels=4,
    num_layers=1,
    attention_head_dim=8,
    num_attention_heads=4,
    caption_projection_dim=32,
    joint_attention_dim=32,
    pooled_projection_dim=64,
    out_channels=4,
)
# tests/pipelines/flux/test_pipeline_flux.py
FLUX_PIPE = dict(
    patch_size=1,
    in_channels=4,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=[4, 4, 8],
)

# ---- text encoders ----
# the CLIPTextConfig written out in diffusers' SD3 and Flux pipeline tests
CLIP = dict(
    bos_token_id=0,
    eos_token_id=2,
    hidden_size=32,
    intermediate_size=37,
    layer_norm_eps=1e-05,
    num_attention_heads=4,
    num_hidden_layers=5,
    pad_token_id=1,
    vocab_size=1000,
    hidden_act="gelu",
    projection_dim=32,
)
TINY_RANDOM_T5 = dict(
    vocab_size=32100,
    d_model=32,
    d_kv=8,
    d_ff=37,
    num_layers=5,
    num_decoder_layers=5,
    num_heads=4,
    relative_attention_num_buckets=8,
    feed_forward_proj="relu",
    dropout_rate=0.1,
    layer_norm_epsilon=1e-6,
    initializer_factor=1.0,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
# tests/pipelines/sana/test_sana.py, except vocab_size (see the module docstring)
GEMMA2 = dict(
    head_dim=16,
    hidden_size=8,
    initializer_range=0.02,
    intermediate_size=64,
    max_position_embeddings=8192,
    num_attention_heads=2,
    num_hidden_layers=1,
    num_key_value_heads=2,
    attn_implementation="eager",
)


def tiny_t5():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(T5Config(**TINY_RANDOM_T5)).eval(), t5_tokenizer()


def tiny_clip(cls_name: str):
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, cls_name)(transformers.CLIPTextConfig(**CLIP)).eval()


def dit_pipeline(**overrides):
    """DiTPipeline: DDIMScheduler() (clip_sample=True, leading spacing) and AutoencoderKL() (one block: factor 1).

    diffusers initialises every block's timestep/class embedder independently; released DiT checkpoints (converted
    from one shared embedder) hold identical copies, and that is all our loader accepts, so block 0's copy is
    written into the others (test_diffusers_configs checks that distinct copies are refused)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(**dict(DIT_PIPE, **overrides)).eval()
    tie_dit_embedders(transformer)
    torch.manual_seed(0)
    vae = AutoencoderKL().eval()
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())


def tie_dit_embedders(model):
    with torch.no_grad():
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model


def pixart_pipeline(sigma: bool, **overrides):
    """PixArtSigmaPipeline / PixArtAlphaPipeline: DDIMScheduler(), AutoencoderKL(), tiny-random-t5."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(**dict(PIXART_PIPE, **overrides)).eval()
    torch.manual_seed(0)
    vae = AutoencoderKL().eval()
    text_encoder, tokenizer = tiny_t5()
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    return cls(
        transformer=transformer,
        vae=vae,
        scheduler=DDIMScheduler(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )


def sana_pipeline(**overrides):
    """SanaPipeline: FlowMatchEulerDiscreteScheduler(shift=7.0), a 2-block AutoencoderDC (factor 2), tiny Gemma-2."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(**dict(SANA_PIPE, **overrides)).eval()
    torch.manual_seed(0)
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=[1, 1],
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()
    torch.manual_seed(0)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    tokenizer = gemma_tokenizer()
    torch.manual_seed(0)
    text_encoder = Gemma2Model(Gemma2Config(vocab_size=len(tokenizer), **GEMMA2)).eval()
    return SanaPipeline(
        transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer
    )


def sd3_pipeline(**overrides):
    """StableDiffusion3Pipeline: FlowMatchEulerDiscreteScheduler() (shift 1), a 1-block AutoencoderKL (factor 1),
    two CLIPs with projection (hidden 32 each: their 64 concatenated channels are cut to T5's 32 by the pipeline's
    pad) and tiny-random-t5."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**dict(SD3_PIPE, **overrides)).eval()
    text_encoder, text_encoder_2 = (
        tiny_clip("CLIPTextModelWithProjection"),
        tiny_clip("CLIPTextModelWithProjection"),
    )
    text_encoder_3, tokenizer_3 = tiny_t5()
    torch.manual_seed(0)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        text_encoder_3=text_encoder_3,
        tokenizer=clip_tokenizer(model_max_length=77),
        tokenizer_2=clip_tokenizer(model_max_length=77),
        tokenizer_3=tokenizer_3,
        transformer=transformer,
        vae=vae,
    )


def flux_pipeline(**overrides):
    """FluxPipeline: FlowMatchEulerDiscreteScheduler() (shift 1, no dynamic shifting), a 1-channel 1-block
    AutoencoderKL (factor 1, so 2 pixels per packed token side), CLIPTextModel and tiny-random-t5."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**dict(FLUX_PIPE, **overrides)).eval()
    text_encoder = tiny_clip("CLIPTextModel")
    text_encoder_2, tokenizer_2 = tiny_t5()
    torch.manual_seed(0)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(model_max_length=77),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
        vae=vae,
    )
