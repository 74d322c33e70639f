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

from .graphs import IOSpec

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
TOKENIZER_FILE = "tokenizer.json"


class ClipGraph(nn.Module):
    """CLIP text tower: input_ids (B, T) -> penultimate hidden states (B, T, D) and the pooled EOS vector:
    `text_embeds` (projected) for CLIPTextModelWithProjection (SD3), `pooler_output` for CLIPTextModel (Flux)."""

    def __init__(self, model: CLIPTextModel | CLIPTextModelWithProjection, seq_len: int = 77):
        super().__init__()
        _check(model, (CLIPTextModel, CLIPTextModelWithProjection), seq_len)
        cfg, f, T = model.config, _dtype(model), seq_len
        if seq_len > cfg.max_position_embeddings:
            raise ConfigError(f"seq_len {seq_len} exceeds this CLIP's max_position_embeddings "
                              f"{cfg.max_position_embeddings}; use at most that")
        self.model, self.projected = model.eval(), isinstance(model, CLIPTextModelWithProjection)
        pooled = IOSpec("text_embeds", f, ("B", cfg.projection_dim)) if self.projected else \
            IOSpec("pooler_output", f, ("B", cfg.hidden_size))
        self.inputs = [IOSpec("input_ids", "int64", ("B", T))]
        self.outputs = [IOSpec("hidden_states", f, ("B", T, cfg.hidden_size)), pooled]

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(input_ids, output_hidden_states=True)
        pooled = out.text_embeds if self.projected else out.pooler_output
        return out.hidden_states[-2], pooled  # penultimate layer, before the final LayerNorm: SD3's clip_skip=None


class EncoderGraph(nn.Module):
    """T5EncoderModel or Gemma2Model: input_ids [, attention_mask] (B, T) -> last_hidden_state (B, T, D).
    attention_mask: whether the family's pipeline passes the mask (PixArt, Sana) or not (SD3, Flux)."""

    def __init__(self, model: T5EncoderModel | Gemma2Model, seq_len: int, attention_mask: bool):
        super().__init__()
        _check(model, (T5EncoderModel, Gemma2Model), seq_len)
        D, T = model.config.hidden_size, seq_len  # T5Config maps hidden_size to d_model
        self.model = model.eval()
        self.inputs = [IOSpec("input_ids", "int64", ("B", T))]
        self.inputs += [IOSpec("attention_mask", "int64", ("B", T))] if attention_mask else []
        self.outputs = [IOSpec("last_hidden_state", _dtype(model), ("B", T, D))]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model(input_ids, attention_mask=attention_mask).last_hidden_state


def _check(model: nn.Module, types: tuple[type, ...], seq_len: int) -> None:
    if not isinstance(model, types):
        names = ", ".join(t.__name__ for t in types)
        raise ConfigError(f"got a {type(model).__name__}; this graph wraps {names} (see export/text_encoders.py)")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len {seq_len!r} must be a positive number of tokens")


def _dtype(model: nn.Module) -> str:
    if model.dtype not in DTYPE_NAMES:
        raise ConfigError(f"text encoder dtype {model.dtype} is not exportable; use one of "
                          f"{sorted(DTYPE_NAMES.values())}")
    return DTYPE_NAMES[model.dtype]


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
            raise ConfigError(f"cannot convert {type(tokenizer).__name__} to a tokenizer.json ({e}); install "
                              "sentencepiece and protobuf, or load the tokenizer from a folder that has a "
                              "tokenizer.json") from None
    tok = Tokenizer.from_str(backend.to_str())  # a copy: the caller's tokenizer keeps its state
    tok.no_padding()
    tok.no_truncation()
    path = Path(folder) / TOKENIZER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path
