"""Train the built-in `text-digits` demo: a Sana-style text-to-image model on scikit-learn's digits with captions.

It is written as a regular diffusers SanaPipeline folder, so `dit-export text-digits` takes the same path as a
real checkpoint (loader, Gemma-2 prompt engine with the instruction prefix, DC-AE decoder, flow DPM-Solver++):
  tokenizer     Gemma-style BPE (byte fallback) trained on the captions and the instruction prefix
  text_encoder  a tiny Gemma-2 kept at its seeded random init: the denoiser learns to read its states
  vae           a tiny DC-AE (16×16×1 -> 4×4×8), trained first for reconstruction
  transformer   a tiny Sana (linear attention, adaLN-single, cross-attention), rectified flow on the latents
Seeded and CPU-only, so the same command gives the same weights:

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
# {w}: the number word, {n}: the numeral. Several phrasings so prompts need not follow one pattern.
TEMPLATES = ("a handwritten {w}", "the digit {n}", "the number {w}", "a handwritten digit {n}", "{w}", "{n}",
             "digit {w}", "the number {n}", "a drawing of the digit {w}", "an image of a handwritten {n}")


def caption(template: str, digit: int) -> str:
    return template.format(w=WORDS[digit], n=digit)


def build_tokenizer(extra_text: list[str]):
    """Gemma-2's tokenizer layout (BPE with byte fallback, <bos> added, <pad> id 0) over a tiny vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    corpus = [caption(t, d) for t in TEMPLATES for d in range(10)] + extra_text
    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme="never")  # merges stay inside words
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=640, special_tokens=specials, show_progress=False))
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    return GemmaTokenizer(vocab=bpe.get_vocab(), merges=merges, add_bos_token=True, add_eos_token=False)


def build_models(vocab_size: int, seed: int):
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=1024, pad_token_id=0, bos_token_id=2,
        eos_token_id=1)).eval().requires_grad_(False)
    vae = AutoencoderDC(
        in_channels=1, latent_channels=8, attention_head_dim=8, encoder_block_types=("ResBlock",) * 3,
        decoder_block_types=("ResBlock",) * 3, encoder_block_out_channels=(16, 32, 64),
        decoder_block_out_channels=(16, 32, 64), encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1), encoder_qkv_multiscales=((), (), ()), decoder_qkv_multiscales=((), (), ()),
        upsample_block_type="interpolate", downsample_block_type="Conv", decoder_norm_types="rms_norm",
        decoder_act_fns="silu", scaling_factor=1.0)
    transformer = SanaTransformer2DModel(
        in_channels=8, out_channels=8, num_attention_heads=4, attention_head_dim=32, num_layers=6,
        num_cross_attention_heads=4, cross_attention_head_dim=32, cross_attention_dim=128, caption_channels=64,
        mlp_ratio=2.5, sample_size=4, patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6)
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
            print(f"vae step {step + 1}/{steps}  loss {np.mean(losses[-log_every:]):.4f}  "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
    return float(np.mean(losses[-log_every:])), time.perf_counter() - start


@torch.no_grad()
def encode_captions(tokenizer, text_encoder, prompts: list[str]):
    """Prompt states exactly as SanaPipeline computes them: (positive states, mask), (empty-prompt states, mask)."""
    from diffusers import SanaPipeline

    from ..folder import SANA_INSTRUCTION

    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, transformer=None, scheduler=None)
    emb, mask, null, null_mask = pipe.encode_prompt(prompts, True, "", device=torch.device("cpu"),
                                                    complex_human_instruction=list(SANA_INSTRUCTION))
    # Masked keys get no attention weight, so the padding after the last real token can be cut: the same
    # result as the full 300 tokens, for a fraction of the cross-attention cost of training.
    used = int(mask.nonzero()[:, 1].max()) + 1
    return (emb[:, :used], mask[:, :used].float()), (null[0, :used], null_mask[0, :used].float())


def train_transformer(model, latents, labels, embeds, masks, null, steps, batch_size, lr, g, log_every):
    """Rectified flow: x_σ = (1 − σ)·x0 + σ·noise, predict noise − x0 at timestep σ·1000; 10% empty prompts."""
    n_templates = embeds.shape[0] // 10
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 500))
    start, losses = time.perf_counter(), []
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch_size,), generator=g)
        x0, y = latents[idx], labels[idx]
        cap = torch.randint(0, n_templates, (batch_size,), generator=g) * 10 + y
        emb, mask = embeds[cap].clone(), masks[cap].clone()
        drop = torch.rand(batch_size, generator=g) < 0.1
        emb[drop], mask[drop] = null[0], null[1]
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
            print(f"transformer step {step + 1}/{steps}  loss {np.mean(losses[-log_every:]):.4f}  "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
    return ema, float(np.mean(losses[-log_every:])), time.perf_counter() - start


def train(out: Path, vae_steps: int, steps: int, batch_size: int, lr: float, seed: int, log_every: int = 250) -> dict:
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline

    from ..folder import SANA_INSTRUCTION

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = digits_images()
    data, targets = torch.from_numpy(images), torch.from_numpy(labels)
    tokenizer = build_tokenizer(list(SANA_INSTRUCTION))
    text_encoder, vae, transformer = build_models(len(tokenizer), seed)

    vae_loss, vae_seconds = train_vae(vae, data, vae_steps, batch_size, g, log_every)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = vae.encode(data).latent
        scale = float(1.0 / z.std())
        vae.register_to_config(scaling_factor=scale)
        latents = z * scale

    start = time.perf_counter()
    prompts = [caption(t, d) for t in TEMPLATES for d in range(10)]  # index = template·10 + digit
    (embeds, masks), null = encode_captions(tokenizer, text_encoder, prompts)
    text_seconds = time.perf_counter() - start

    transformer.train()
    ema, loss, seconds = train_transformer(transformer, latents, targets, embeds, masks, null, steps,
                                           batch_size, lr, g, log_every)
    info = {"vae_steps": vae_steps, "vae_final_loss": vae_loss, "steps": steps, "batch_size": batch_size, "lr": lr,
            "seed": seed, "ema": 0.999, "final_loss": loss, "templates": list(TEMPLATES),
            "seconds": round(vae_seconds + text_seconds + seconds)}

    scheduler = DPMSolverMultistepScheduler(flow_shift=1.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=ema, scheduler=scheduler)
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
    parser.add_argument("--out", required=True, type=Path, help="folder to write (a diffusers SanaPipeline folder)")
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    info = train(args.out, args.vae_steps, args.steps, args.batch_size, args.lr, args.seed)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
