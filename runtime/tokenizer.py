"""Prompt -> fixed-length token ids, as diffusers pipelines call their transformers tokenizers
(`padding="max_length", max_length=L, truncation=True, add_special_tokens=True`), from `tokenizer.json` alone.

Thread safety: the `tokenizers` object is configured once at load and never mutated afterwards (no
enable_padding/enable_truncation per call, the cause of "Already borrowed" under concurrency); truncation and
padding act on each call's own Encoding. So one TextTokenizer serves concurrent requests without a lock.
"""

from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Encoding, Tokenizer

from .errors import ConfigError, InputError, ManifestError

SIDES = ("right", "left")


@dataclass(frozen=True)
class TokenizerConfig:
    """One text encoder's tokenization, carried by the manifest."""

    max_length: int  # tokens per prompt, special tokens included (CLIP 77; T5 120/256/300/512; Gemma 300)
    pad_id: int  # CLIP-L <|endoftext|>, CLIP-G "!", T5 and Gemma <pad>
    padding_side: str = "right"  # Sana sets "right" on Gemma's tokenizer (whose own default is "left")

    def __post_init__(self):
        if not isinstance(self.max_length, int) or self.max_length < 1:
            raise ConfigError(f"tokenizer max_length {self.max_length!r} must be a positive integer")
        if not isinstance(self.pad_id, int) or self.pad_id < 0:
            raise ConfigError(f"tokenizer pad_id {self.pad_id!r} must be a token id (an integer >= 0)")
        if self.padding_side not in SIDES:
            raise ConfigError(f"tokenizer padding_side {self.padding_side!r} is not one of {SIDES}")


@dataclass(frozen=True)
class Tokens:
    input_ids: np.ndarray  # (B, max_length) int64
    attention_mask: np.ndarray  # (B, max_length) int64: 1 = token, 0 = padding
    lengths: tuple[int, ...]  # tokens per prompt before truncation, special tokens included
    max_length: int

    @property
    def truncated(self) -> tuple[bool, ...]:
        """Per prompt: was it cut to max_length? (the caller warns, naming the limit)"""
        return tuple(n > self.max_length for n in self.lengths)


def check_text(name: str, text) -> str:
    """`text` if the tokenizer can take it: a str of valid Unicode. Lone surrogates (what Python makes of argv
    bytes that are not UTF-8) would make the tokenizers library raise a bare TypeError."""
    if not isinstance(text, str):
        hint = "; decode bytes first" if isinstance(text, (bytes, bytearray)) else ""
        raise InputError(
            f"{name} {text!r:.60} is not allowed: it must be a string (str), not {type(text).__name__}{hint}"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # the text is left out of the message: it may not be printable
        raise InputError(
            f"{name} holds characters that are not valid Unicode (lone surrogate at index {e.start}, "
            "e.g. from bytes that are not UTF-8); give UTF-8 text"
        ) from None
    return text


class TextTokenizer:
    def __init__(self, path: str | PathLike, config: TokenizerConfig):
        path = Path(path)
        if not path.is_file():
            raise ManifestError(f"tokenizer file {str(path)!r} is missing; re-export the engine folder")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust parser raises its own exception type
            raise ManifestError(
                f"tokenizer file {str(path)!r} cannot be read ({e}); re-export the engine folder"
            ) from None
        tok.no_padding()  # a tokenizer.json may carry its own settings; ours come from config, per call
        tok.no_truncation()
        vocab = tok.get_vocab_size(with_added_tokens=True)
        if config.pad_id >= vocab:
            raise ConfigError(
                f"tokenizer pad_id {config.pad_id} is outside {str(path)!r}'s vocabulary of {vocab}"
            )
        self.config, self._tok = config, tok
        self._pad_token = tok.id_to_token(config.pad_id)
        self._specials = tok.num_special_tokens_to_add(is_pair=False)  # e.g. CLIP: BOS + EOS; T5: EOS
        self._check_length(config.max_length)

    def __call__(self, prompts: str | Sequence[str], max_length: int | None = None) -> Tokens:
        """Tokenize a prompt or a batch. max_length overrides the config's (Sana's instruction-prefixed prompt)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        bad = [p for p in prompts if not isinstance(p, str)]
        if not prompts or bad:
            raise InputError(f"prompts must be a string or a non-empty list of strings, got {prompts!r:.80}")
        prompts = [check_text("prompt", p) for p in prompts]  # and valid Unicode
        limit = self.config.max_length if max_length is None else max_length
        self._check_length(limit)
        encoded = [self._encode(p, limit) for p in prompts]
        return Tokens(
            np.array([e.ids for e, _ in encoded], dtype=np.int64),
            np.array([e.attention_mask for e, _ in encoded], dtype=np.int64),
            tuple(n for _, n in encoded),
            limit,
        )

    def _encode(self, prompt: str, limit: int) -> tuple[Encoding, int]:
        # What tokenizers does inside encode() when truncation and padding are enabled: truncate the text's
        # tokens to leave room for the special tokens (from the right, transformers' default), add them, pad.
        try:
            enc = self._tok.encode(prompt, add_special_tokens=False)
            n = len(enc.ids) + self._specials
            if n > limit:
                enc.truncate(limit - self._specials)
            enc = self._tok.post_process(enc, add_special_tokens=True)
        except (
            Exception
        ) as e:  # the Rust library raises its own exception type (e.g. a vocabulary without [UNK])
            message = " ".join(str(e).split())[:200]
            raise ManifestError(
                f"the engine folder's tokenizer cannot encode the prompt ({message}); re-export the folder"
            ) from None
        enc.pad(
            limit, direction=self.config.padding_side, pad_id=self.config.pad_id, pad_token=self._pad_token
        )
        return enc, n

    def _check_length(self, limit: int) -> None:
        if not isinstance(limit, int) or limit <= self._specials:
            raise ConfigError(
                f"tokenizer max_length {limit!r} leaves no room for text: it must be an integer "
                f"above {self._specials}, the special tokens this tokenizer adds; use a larger one"
            )
