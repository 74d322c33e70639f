"""Text-encoder engines: transformers' CLIP, T5 and Gemma-2 as graphs with a fixed sequence length T and a
dynamic batch B, each with its I/O declared once; and the tokenizer.json the runtime tokenizes with.

What each diffusers pipeline feeds its encoders and keeps (verified in diffusers' sources):
  SD3/3.5  CLIP-L, CLIP-G (CLIPTextModelWithProjection), T=77, ids only -> hidden_states[-2] and text_embeds
           T5 (T5EncoderModel), T=256, ids only -> last_hidden_state   (pipeline_stable_diffusion_3.py)
  Flux     CLIP-L (CLIPTextModel), T=77, ids only -> pooler_output
           T5, T=512 (schnell 256), ids only -> last_hidden_state        (pipeline_flux.py)
  PixArt   T5, T=120 (α) / 300 (Σ), ids and attention mask -> last_hidden_state   (pipeline_pixart_*.py)
  Sana     Gemma2Model, T=300 (+ the instruction prefix), ids and attention mask -> last_hidden_state
           (pipeline_sana.py)
Without a mask the padded tokens are attended, so T is part of the model's behaviour, not an optimisation.

Export a graph with `export_onnx(graph, graph.inputs, graph.outputs, path)`.
"""

from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, Gemma2Model, T5EncoderModel

from ditrt.runtime.errors import ConfigError
from ditrt.runtime.manifest import TensorSpec, TextInput

from .precision import FLOAT_DTYPES, PRECISIONS, dtype_name

TOKENIZER_FILE = "tokenizer.json"
T5_MAX = 512  # the SD3 and Flux pipelines refuse a longer max_sequence_length


class ClipGraph(nn.Module):
    """CLIP text tower: input_ids (B, T) -> penultimate hidden states (B, T, D) and the pooled EOS vector:
    `text_embeds` (projected) for CLIPTextModelWithProjection (SD3), `pooler_output` for CLIPTextModel (Flux)."""

    def __init__(self, model: CLIPTextModel | CLIPTextModelWithProjection, seq_len: int = 77):
        super().__init__()
        _check(model, (CLIPTextModel, CLIPTextModelWithProjection), seq_len)
        cfg, f, T = model.config, _dtype(model), seq_len
        if seq_len > cfg.max_position_embeddings:
            raise ConfigError(
                f"seq_len {seq_len} exceeds this CLIP's max_position_embeddings "
                f"{cfg.max_position_embeddings}; use at most that"
            )
        self.model, self.projected = model.eval(), isinstance(model, CLIPTextModelWithProjection)
        pooled = (
            TensorSpec("text_embeds", f, ("B", cfg.projection_dim))
            if self.projected
            else TensorSpec("pooler_output", f, ("B", cfg.hidden_size))
        )
        self.inputs = [TensorSpec("input_ids", "int64", ("B", T))]
        self.outputs = [TensorSpec("hidden_states", f, ("B", T, cfg.hidden_size)), pooled]

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(input_ids, output_hidden_states=True)
        pooled = out.text_embeds if self.projected else out.pooler_output
        return out.hidden_states[
            -2
        ], pooled  # penultimate layer, before the final LayerNorm: SD3's clip_skip=None


class EncoderGraph(nn.Module):
    """T5EncoderModel or Gemma2Model: input_ids [, attention_mask] (B, T) -> last_hidden_state (B, T, D).
    attention_mask: whether the family's pipeline passes the mask (PixArt, Sana) or not (SD3, Flux)."""

    def __init__(self, model: T5EncoderModel | Gemma2Model, seq_len: int, attention_mask: bool):
        super().__init__()
        _check(model, (T5EncoderModel, Gemma2Model), seq_len)
        D, T = model.config.hidden_size, seq_len  # T5Config maps hidden_size to d_model
        self.model = model.eval()
        self.inputs = [TensorSpec("input_ids", "int64", ("B", T))]
        self.inputs += [TensorSpec("attention_mask", "int64", ("B", T))] if attention_mask else []
        self.outputs = [TensorSpec("last_hidden_state", _dtype(model), ("B", T, D))]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model(input_ids, attention_mask=attention_mask).last_hidden_state


# Prompt engines: one graph per pipeline whose outputs are exactly the denoiser step graph's prompt inputs, in fp32
# whatever precision each encoder computes in (see export/precision.py).


class MaskedPromptGraph(nn.Module):
    """PixArt (T5) / Sana (Gemma-2): masked encoder states, and the mask passed through, as the prompt inputs.
    seq_len "T" makes the length dynamic (Sana's instruction-prefixed prompt is longer than its negative)."""

    def __init__(self, encoder: T5EncoderModel | Gemma2Model, seq_len: int | str, width: int):
        super().__init__()
        self.encoder = EncoderGraph(encoder, seq_len, attention_mask=True)
        T = seq_len
        self.inputs = self.encoder.inputs
        self.outputs = [
            TensorSpec("prompt_embeds", "float32", ("B", T, width)),
            TensorSpec("prompt_attention_mask", "int64", ("B", T)),
        ]

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.encoder(input_ids, attention_mask).float(), attention_mask * 1


class SD3PromptGraph(nn.Module):
    """SD3 (diffusers encode_prompt): CLIP-L and CLIP-G penultimate states side by side, zero-padded to T5's
    width, then T5's tokens after them; pooled = both projected CLIP embeddings."""

    def __init__(
        self,
        clip_l: CLIPTextModelWithProjection,
        clip_g: CLIPTextModelWithProjection,
        t5: T5EncoderModel,
        clip_len: int = 77,
        t5_len: int = 256,
    ):
        super().__init__()
        self.clip_l, self.clip_g = ClipGraph(clip_l, clip_len), ClipGraph(clip_g, clip_len)
        self.t5 = EncoderGraph(t5, t5_len, attention_mask=False)
        width, pooled = t5.config.d_model, clip_l.config.projection_dim + clip_g.config.projection_dim
        self.inputs = [
            TensorSpec(f"{n}_input_ids", "int64", ("B", L))
            for n, L in (("clip_l", clip_len), ("clip_g", clip_len), ("t5", t5_len))
        ]
        S = (
            clip_len + t5_len if isinstance(t5_len, int) else f"{clip_len}+{t5_len}"
        )  # T5's tokens after CLIP's
        self.outputs = [
            TensorSpec("prompt_embeds", "float32", ("B", S, width)),
            TensorSpec("pooled_prompt_embeds", "float32", ("B", pooled)),
        ]

    def forward(
        self, clip_l_input_ids: Tensor, clip_g_input_ids: Tensor, t5_input_ids: Tensor
    ) -> tuple[Tensor, Tensor]:
        (l_states, l_pooled), (g_states, g_pooled) = (
            self.clip_l(clip_l_input_ids),
            self.clip_g(clip_g_input_ids),
        )
        t5 = self.t5(t5_input_ids).float()  # (B, 256, 4096); prompt engines output fp32 at any precision
        clip = torch.cat([l_states.float(), g_states.float()], dim=-1)  # (B, 77, 768 + 1280)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=1), torch.cat([l_pooled.float(), g_pooled.float()], dim=-1)


class FluxPromptGraph(nn.Module):
    """Flux (diffusers FluxPipeline.encode_prompt): T5 states as the prompt, CLIP-L's pooled output."""

    def __init__(self, clip_l: CLIPTextModel, t5: T5EncoderModel, clip_len: int = 77, t5_len: int = 512):
        super().__init__()
        self.clip_l, self.t5 = ClipGraph(clip_l, clip_len), EncoderGraph(t5, t5_len, attention_mask=False)
        self.inputs = [
            TensorSpec("clip_l_input_ids", "int64", ("B", clip_len)),
            TensorSpec("t5_input_ids", "int64", ("B", t5_len)),
        ]
        self.outputs = [
            TensorSpec("prompt_embeds", "float32", ("B", t5_len, t5.config.d_model)),
            TensorSpec("pooled_prompt_embeds", "float32", ("B", clip_l.config.hidden_size)),
        ]

    def forward(self, clip_l_input_ids: Tensor, t5_input_ids: Tensor) -> tuple[Tensor, Tensor]:
        return self.t5(t5_input_ids).float(), self.clip_l(clip_l_input_ids)[1].float()


def _check(model: nn.Module, types: tuple[type, ...], seq_len: int | str) -> None:
    if not isinstance(model, types):
        names = ", ".join(t.__name__ for t in types)
        raise ConfigError(
            f"got a {type(model).__name__}; this graph wraps {names} (see export/text_encoders.py)"
        )
    if isinstance(seq_len, str):  # a symbolic (dynamic) length
        return
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len {seq_len!r} must be a positive number of tokens")


def _dtype(model: nn.Module) -> str:
    if model.dtype not in FLOAT_DTYPES:
        raise ConfigError(
            f"text encoder dtype {model.dtype} is not exportable; use one of {', '.join(PRECISIONS.values())}"
        )
    return dtype_name(model.dtype)


def save_tokenizer(tokenizer, folder: Path) -> Path:
    """Write folder/tokenizer.json from a transformers tokenizer (a slow one is converted), without any
    padding/truncation state: the runtime pads and truncates from the manifest's settings."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer, e.g. transformers 4.x's sentencepiece T5Tokenizer
        from transformers.convert_slow_tokenizer import convert_slow_tokenizer

        try:
            backend = convert_slow_tokenizer(tokenizer)
        except Exception as e:  # converters raise ValueError, ImportError, AttributeError...
            raise ConfigError(
                f"cannot convert {type(tokenizer).__name__} to a tokenizer.json ({e}); install "
                "sentencepiece and protobuf, or load the tokenizer from a folder that has a "
                "tokenizer.json"
            ) from None
    tok = Tokenizer.from_str(backend.to_str())  # a copy: the caller's tokenizer keeps its state
    tok.no_padding()
    tok.no_truncation()
    path = Path(folder) / TOKENIZER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def unmasked_tokenizers(path: Path, rows: list[tuple[str, str, int]]) -> list:
    """SD3/Flux tokenizers (their encoders take no mask): (subfolder, tokenizer, TextInput) per (subfolder, name,
    length). T5's length is chosen per request (max_sequence_length, up to T5_MAX); CLIP's is fixed."""
    from transformers import AutoTokenizer

    out = []
    for sub, name, n in rows:
        tok = AutoTokenizer.from_pretrained(path / sub)
        spec = TextInput(
            f"{sub}/tokenizer.json",
            n,
            tok.pad_token_id,
            input_ids=f"{name}_input_ids",
            attention_mask=None,
            length_range=[2, T5_MAX] if name == "t5" else [],
        )
        out.append((sub, tok, spec))
    return out
