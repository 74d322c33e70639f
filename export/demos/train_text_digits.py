"""Train the built-in `text-digits` demo: a Sana-style text-to-image model on scikit-learn's digits with captions.

It is written as a regular diffusers SanaPipeline folder, so `dit-export text-digits` takes the same path as a
real checkpoint (loader, Gemma-2 prompt engine with the instruction prefix, DC-AE decoder, flow DPM-Solver++):
  captions      the ten TEMPLATES and 400 composed captions per digit (random leads, adjectives, nouns, word
                orders, filler and made-up words, word dropout, punctuation), so that new phrasings work; the
                HELD_OUT phrasings share no template and no content word with any of them
  tokenizer     Gemma-style BPE (byte fallback) trained on the captions and the instruction prefix
  text_encoder  a tiny Gemma-2 at its seeded random init, but for token embeddings large enough that each
                token's state is mostly the token itself: the denoiser learns to read its states
  vae           a tiny DC-AE (16×16×1 -> 4×4×8), trained first for reconstruction
  transformer   a tiny Sana (linear attention, adaLN-single, cross-attention), rectified flow on the latents
Seeded and CPU-only, so the same command gives the same weights (about 20 minutes on 2 cores):

    python -m ditrt.export.demos.train_text_digits --out export/demos/text_digits
"""

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import digits_images

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {w}: the number word, {n}: the numeral. The phrasings of the first release, still trained on as they are.
TEMPLATES = (
    "a handwritten {w}",
    "the digit {n}",
    "the number {w}",
    "a handwritten digit {n}",
    "{w}",
    "{n}",
    "digit {w}",
    "the number {n}",
    "a drawing of the digit {w}",
    "an image of a handwritten {n}",
)
# Chosen before training and never generated: the test judges the demo on these. Their content words (all but
# a, the, of, number, is) appear in no training caption, so no template is shared, not even a near-duplicate.
HELD_OUT = (
    "draw a {w}",
    "{w}, written by hand",
    "can you sketch the numeral {n}?",
    "my favourite number is {w}",
    "{n} on a sheet of paper",
    "a pencil doodle showing {w}",
    "give me {n} please",
    "the answer is {n}",
)
SHARED = {"a", "the", "of", "number", "is"}  # the only held-out words that training captions may use

# The caption grammar: [lead] [determiner] [adjectives] [noun] NUMBER [tail], in a few orders, with filler words,
# word dropout and punctuation, so that the denoiser learns to find the number among whatever words surround it.
LEADS = (
    "show",
    "generate",
    "create",
    "render",
    "produce",
    "display",
    "print",
    "paint",
    "make",
    "i need",
    "i would like",
    "let us see",
    "here is",
    "this is",
    "look at",
    "an image of",
    "a photo of",
    "a drawing of",
    "an illustration of",
    "a scan of",
    "a rendering of",
    "an example of",
    "a sample of",
    "a photograph of",
    "a close up of",
    "image:",
    "prompt:",
    "output:",
    "wanted:",
    "we need",
    "lets get",
)
DETS = ("a", "an", "the", "some", "another", "a single", "just a", "only the", "this", "that")
ADJS = (
    "handwritten",
    "small",
    "big",
    "large",
    "tiny",
    "bold",
    "thin",
    "thick",
    "neat",
    "messy",
    "black",
    "white",
    "gray",
    "grey",
    "blurry",
    "clean",
    "simple",
    "crooked",
    "slanted",
    "careful",
    "scribbled",
    "pixelated",
    "grayscale",
    "cursive",
    "printed",
    "digital",
    "old",
    "clear",
    "faint",
    "dark",
    "bright",
    "wobbly",
    "lovely",
    "random",
    "centered",
    "plain",
    "rough",
    "tidy",
    "fancy",
    "sloppy",
    "nice",
    "cute",
    "ugly",
    "shaky",
)
NOUNS = ("digit", "number", "figure", "symbol", "character", "glyph", "value", "label", "integer", "mark")
TAILS = (
    "in ink",
    "in black and white",
    "at low resolution",
    "in the middle",
    "with a marker",
    "with chalk",
    "in grayscale",
    "from a scanner",
    "for a dataset",
    "as an image",
    "again",
    "now",
    "today",
    "quickly",
    "in a box",
    "at the center",
    "like a child would",
    "in blue",
    "very large",
    "very small",
    "for us",
    "for the test",
    "to classify",
    "style",
    "art",
    "image",
    "picture",
    "photo",
    "scan",
    "sample",
)
FILLERS = (
    "cat",
    "dog",
    "house",
    "tree",
    "blue",
    "red",
    "green",
    "water",
    "river",
    "stone",
    "apple",
    "bread",
    "chair",
    "table",
    "window",
    "light",
    "night",
    "day",
    "sun",
    "moon",
    "star",
    "car",
    "road",
    "city",
    "music",
    "song",
    "happy",
    "sad",
    "fast",
    "slow",
    "warm",
    "cold",
    "soft",
    "hard",
    "open",
    "close",
    "up",
    "down",
    "left",
    "right",
    "over",
    "under",
    "very",
    "really",
    "quite",
    "maybe",
    "yes",
    "no",
    "ok",
    "hello",
    "thanks",
    "cool",
    "good",
    "bad",
    "best",
    "all",
    "any",
    "each",
    "every",
    "with",
    "without",
    "from",
    "to",
    "for",
    "at",
    "in",
    "and",
    "or",
    "but",
    "so",
    "if",
    "then",
    "there",
    "here",
    "it",
    "its",
    "that",
    "what",
    "which",
    "who",
    "how",
    "why",
    "when",
    "where",
    "this",
    "those",
    "these",
    "kind",
    "sort",
    "type",
    "version",
    "thing",
    "stuff",
    "shape",
    "form",
    "line",
    "curve",
    "dot",
    "circle",
    "square",
    "corner",
    "edge",
    "center",
    "top",
    "bottom",
    "side",
    "middle",
    "image",
    "photo",
    "art",
    "style",
    "look",
    "view",
    "scene",
    "frame",
    "quality",
    "detail",
    "high",
    "low",
    "resolution",
    "pixel",
    "pixels",
    "mnist",
    "dataset",
    "sklearn",
    "example",
    "sample",
    "test",
    "train",
    "model",
    "ai",
    "generate",
    "output",
    "result",
    "final",
    "first",
    "last",
    "next",
    "other",
    "same",
    "new",
    "nice",
    "cute",
    "neat",
    "bold",
    "thin",
    "glyph",
    "ink",
    "marker",
)
PUNCT = (".", "!", "?", ",", ":", ";", "...", "-")


def caption(template: str, digit: int) -> str:
    return template.format(w=WORDS[digit], n=digit)


def _contains_number_word(word: str) -> bool:
    return any(w in word for w in WORDS)


def compose(rng, digit: int, max_chars: int = 40) -> str:
    """One random caption asking for `digit` (rng: a random.Random, so the captions are reproducible), at most
    max_chars long (about 20 tokens: the text length is what costs most in training, after the 4×4 latents)."""
    while len(text := _compose(rng, digit)) > max_chars:
        pass
    return text


def _compose(rng, digit: int) -> str:
    num = str(digit) if rng.random() < 0.5 else WORDS[digit]
    r = rng.random()
    if r < 0.05:
        num = f"#{digit}"
    elif r < 0.10:
        num = rng.choice(('"{}"', "'{}'", "({})", "[{}]")).format(num)
    elif r < 0.13:
        num = f"{WORDS[digit]} ({digit})"
    adjs = rng.sample(ADJS, rng.choice((0, 0, 1, 1, 1, 2, 3)))
    lead = rng.choice(LEADS).split() if rng.random() < 0.5 else []
    det = rng.choice(DETS).split() if rng.random() < 0.6 else []
    noun = [rng.choice(NOUNS)] if rng.random() < 0.5 else []
    tail = rng.choice(TAILS).split() if rng.random() < 0.4 else []
    order = rng.random()
    if order < 0.6:  # a small handwritten digit 7
        words = lead + det + adjs + noun + [num] + tail
    elif order < 0.8:  # a 7 digit, handwritten
        words = lead + det + [num] + noun + adjs + tail
    else:  # 7, a small handwritten digit
        words = [num + ","] + lead + det + adjs + noun + tail
    words = [w for w in words if w == num or w == num + "," or rng.random() > 0.1]  # word dropout
    for _ in range(rng.choice((0, 0, 0, 1, 1, 2, 3))):  # filler: real words or made-up ones
        filler = (
            rng.choice(FILLERS)
            if rng.random() < 0.7
            else "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
        )
        if _contains_number_word(filler) or filler in HELD_OUT_WORDS:
            continue
        words.insert(rng.randint(0, len(words)), filler)
    if rng.random() < 0.2 and len(words) > 1:  # a comma somewhere
        i = rng.randrange(len(words) - 1)
        words[i] = words[i].rstrip(",") + ","
    text = " ".join(words)
    if rng.random() < 0.3:
        text = text.rstrip(",") + rng.choice(PUNCT)
    return text


def _words(text: str) -> list[str]:
    return "".join(c if c.isalnum() or c in "{}" else " " for c in text.lower()).split()


HELD_OUT_WORDS = {w for t in HELD_OUT for w in _words(t) if "{" not in w} - SHARED


def caption_bank(per_digit: int, seed: int) -> list[tuple[str, int]]:
    """Random captions for each digit, and a check that none of them shares a word or template with HELD_OUT."""
    import random

    rng = random.Random(seed)
    bank = [(caption(t, d), d) for t in TEMPLATES for d in range(10)]
    bank += [(compose(rng, d), d) for _ in range(per_digit) for d in range(10)]
    for text, digit in bank:
        numbers = [w for w in _words(text) if w.isdigit() or _contains_number_word(w)]
        assert set(numbers) <= {str(digit), WORDS[digit]} and numbers, (
            text
        )  # exactly one number, the right one
        assert not HELD_OUT_WORDS & set(_words(text)), (text, HELD_OUT_WORDS & set(_words(text)))
    return bank


def build_tokenizer(corpus: list[str], vocab_size: int):
    """Gemma-2's tokenizer layout (BPE with byte fallback, <bos> added, <pad> id 0) over a small vocabulary.
    Merges stay inside words and never join punctuation or digits, so a numeral is always its own token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace("▁", prepend_scheme="never"),
            pre_tokenizers.Punctuation("isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    )
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    return GemmaTokenizer(vocab=bpe.get_vocab(), merges=merges, add_bos_token=True, add_eos_token=False)


def build_models(vocab_size: int, seed: int, embed_std: float = 1.0):
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    text_encoder = (
        Gemma2Model(
            Gemma2Config(
                vocab_size=vocab_size,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=32,
                max_position_embeddings=1024,
                pad_token_id=0,
                bos_token_id=2,
                eos_token_id=1,
            )
        )
        .eval()
        .requires_grad_(False)
    )
    # Token embeddings at std 1 instead of 0.02: Gemma-2 normalises each attention and MLP output to unit RMS
    # before adding it to the residual stream, so with the usual init a token's state is mostly a random mix of
    # the 300-token instruction before it and a new phrasing changes it. At std 1 (×√64 inside Gemma) the token
    # itself dominates its state, and the number reads the same whatever words surround it.
    with torch.no_grad():
        text_encoder.embed_tokens.weight.normal_(0.0, embed_std)
        text_encoder.embed_tokens.weight[0] = 0  # <pad>
    vae = AutoencoderDC(
        in_channels=1,
        latent_channels=8,
        attention_head_dim=8,
        encoder_block_types=("ResBlock",) * 3,
        decoder_block_types=("ResBlock",) * 3,
        encoder_block_out_channels=(16, 32, 64),
        decoder_block_out_channels=(16, 32, 64),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        encoder_qkv_multiscales=((), (), ()),
        decoder_qkv_multiscales=((), (), ()),
        upsample_block_type="interpolate",
        downsample_block_type="Conv",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=1.0,
    )
    transformer = SanaTransformer2DModel(
        in_channels=8,
        out_channels=8,
        num_attention_heads=4,
        attention_head_dim=32,
        num_layers=6,
        num_cross_attention_heads=4,
        cross_attention_head_dim=32,
        cross_attention_dim=128,
        caption_channels=64,
        mlp_ratio=2.5,
        sample_size=4,
        patch_size=1,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    return text_encoder, vae, transformer


def ema_update(ema, model, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)


def train_vae(vae, data: torch.Tensor, steps: int, batch_size: int, g: torch.Generator, log_every: int):
    """Reconstruction loss; noise on the latents makes the decoder tolerant of imperfect sampled latents."""
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    start, losses = time.perf_counter(), []
    for step in range(steps):
        x = data[torch.randint(0, len(data), (batch_size,), generator=g)]
        z = vae.encode(x).latent
        z = z + 0.1 * z.detach().std() * torch.randn(z.shape, generator=g)
        loss = F.mse_loss(vae.decode(z).sample, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            print(
                f"vae step {step + 1}/{steps}  loss {np.mean(losses[-log_every:]):.4f}  "
                f"{time.perf_counter() - start:.0f}s",
                flush=True,
            )
    return float(np.mean(losses[-log_every:])), time.perf_counter() - start


@torch.no_grad()
def encode_captions(tokenizer, text_encoder, prompts: list[str], chunk: int = 256):
    """Prompt states as SanaPipeline computes them: (positive states, mask), (empty-prompt states, mask).
    The pipeline puts the instruction before each prompt and keeps state 0 (<bos>) and the prompt's states; the
    negative prompt "" gets no instruction, so its one state is <bos> alone. The encoder is causal and pads on the
    right, so the instruction is run once and its cache reused for every caption, and the padding after the
    longest caption (masked keys get no attention weight) is left out."""
    from transformers import DynamicCache

    from ..models.sana import SANA_INSTRUCTION

    chi = "\n".join(SANA_INSTRUCTION)
    n = (
        len(tokenizer.encode(chi)) - 1
    )  # the instruction's tokens but its trailing "▁", which joins the prompt
    enc = tokenizer(
        [chi + p.lower().strip() for p in prompts],
        padding="longest",
        padding_side="right",
        return_tensors="pt",
    )
    ids, mask = enc.input_ids, enc.attention_mask
    assert (ids[:, :n] == ids[:1, :n]).all() and mask[:, :n].all()
    prefix = text_encoder(ids[:1, :n], cache=DynamicCache(config=text_encoder.config), use_cache=True)
    states = []
    for i in range(0, len(prompts), chunk):
        cache = copy.deepcopy(prefix.cache)
        cache.batch_repeat_interleave(len(ids[i : i + chunk]))
        out = text_encoder(ids[i : i + chunk, n:], attention_mask=mask[i : i + chunk], cache=cache)
        states.append(out.last_hidden_state)
    emb = torch.cat([prefix.last_hidden_state[:, :1].expand(len(prompts), -1, -1), torch.cat(states)], 1)
    mask = torch.cat([mask[:, :1], mask[:, n:]], 1).float()
    null = torch.zeros_like(emb[0])
    null[0] = text_encoder(ids[:1, :1]).last_hidden_state[0, 0]
    return (emb, mask), (null, (torch.arange(len(null)) == 0).float())


def train_transformer(
    model, latents, labels, embeds, masks, null, by_digit, template_p, steps, batch_size, lr, g, log_every
):
    """Rectified flow: x_σ = (1 − σ)·x0 + σ·noise, predict noise − x0 at timestep σ·1000; 10% empty prompts.
    by_digit[d]: caption indices for digit d, its first len(TEMPLATES) the fixed templates (drawn with template_p)."""
    n_templates, n_captions = len(TEMPLATES), by_digit.shape[1]
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 500))
    start, losses = time.perf_counter(), []
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch_size,), generator=g)
        x0, y = latents[idx], labels[idx]
        col = torch.where(
            torch.rand(batch_size, generator=g) < template_p,
            torch.randint(0, n_templates, (batch_size,), generator=g),
            torch.randint(n_templates, n_captions, (batch_size,), generator=g),
        )
        cap = by_digit[y, col]
        used = int(
            masks[cap].sum(1).max()
        )  # the longest caption of the batch (the masks are ones, then zeros)
        emb, mask = embeds[cap, :used].clone(), masks[cap, :used].clone()
        drop = torch.rand(batch_size, generator=g) < 0.1
        emb[drop], mask[drop] = null[0][:used], null[1][:used]
        noise = torch.randn(x0.shape, generator=g)
        sigma = torch.rand(batch_size, generator=g)
        xt = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        pred = model(xt, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=sigma * 1000).sample
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_update(ema, model, 0.999)
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            print(
                f"transformer step {step + 1}/{steps}  loss {np.mean(losses[-log_every:]):.4f}  "
                f"{time.perf_counter() - start:.0f}s",
                flush=True,
            )
    return ema, float(np.mean(losses[-log_every:])), time.perf_counter() - start


def train(
    out: Path,
    vae_steps: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    captions: int = 400,
    template_p: float = 0.25,
    vocab_size: int = 1024,
    embed_std: float = 1.0,
    log_every: int = 250,
) -> dict:
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline

    from ..models.sana import SANA_INSTRUCTION

    cpu_start = time.process_time()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = digits_images()
    data, targets = torch.from_numpy(images), torch.from_numpy(labels)
    bank = caption_bank(captions, seed)  # index = i·10 + digit; the templates first
    tokenizer = build_tokenizer([text for text, _ in bank] + list(SANA_INSTRUCTION), vocab_size)
    text_encoder, vae, transformer = build_models(len(tokenizer), seed, embed_std)

    vae_loss, vae_seconds = train_vae(vae, data, vae_steps, batch_size, g, log_every)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = vae.encode(data).latent
        scale = float(1.0 / z.std())
        vae.register_to_config(scaling_factor=scale)
        latents = z * scale

    start = time.perf_counter()
    text_encoder.to(torch.float16).float()  # the stored precision, so training sees the states inference will
    (embeds, masks), null = encode_captions(tokenizer, text_encoder, [text for text, _ in bank])
    by_digit = torch.arange(len(bank)).view(-1, 10).T.contiguous()  # (10, captions per digit)
    text_seconds = time.perf_counter() - start
    print(f"{len(bank)} captions encoded ({embeds.shape[1]} tokens) in {text_seconds:.0f}s", flush=True)

    transformer.train()
    ema, loss, seconds = train_transformer(
        transformer,
        latents,
        targets,
        embeds,
        masks,
        null,
        by_digit,
        template_p,
        steps,
        batch_size,
        lr,
        g,
        log_every,
    )
    info = {
        "vae_steps": vae_steps,
        "vae_final_loss": vae_loss,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "ema": 0.999,
        "final_loss": loss,
        "templates": list(TEMPLATES),
        "composed_captions_per_digit": captions,
        "template_p": template_p,
        "embed_std": embed_std,
        "held_out": list(HELD_OUT),
        "seconds": round(vae_seconds + text_seconds + seconds),
        "cpu_seconds": round(time.process_time() - cpu_start),
        "threads": torch.get_num_threads(),
    }

    scheduler = DPMSolverMultistepScheduler(
        flow_shift=1.0, use_flow_sigmas=True, prediction_type="flow_prediction"
    )
    pipe = SanaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=ema, scheduler=scheduler
    )
    pipe.to(torch.float16)  # fp16 storage keeps the shipped folder small; exports and runs in fp32
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", required=True, type=Path, help="folder to write (a diffusers SanaPipeline folder)"
    )
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--captions", type=int, default=400, help="composed captions per digit")
    args = parser.parse_args()
    torch.set_num_threads(2)
    info = train(args.out, args.vae_steps, args.steps, args.batch_size, args.lr, args.seed, args.captions)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
