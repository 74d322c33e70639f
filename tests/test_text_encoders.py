"""Text encoders: ONNX engines match transformers (fp32), and the runtime tokenizer matches transformers' tokenizers
called the way diffusers' pipelines call them. Tokenizers are trained here on a few sentences (no downloads)."""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tiny_components import clip_tokenizer, gemma_tokenizer, randomize, t5_model, t5_tokenizer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, Gemma2Config, Gemma2Model

from ditrt.export.onnx_export import export_onnx
from ditrt.export.text_encoders import ClipGraph, EncoderGraph, save_tokenizer
from ditrt.runtime.errors import ConfigError, InputError, ManifestError
from ditrt.runtime.tokenizer import TextTokenizer, TokenizerConfig

PROMPTS = [
    "a photo of a cat",
    "",
    "An astronaut riding a horse on the MOON, oil on canvas!! ü 😀 " * 2,
    "a cat </s> <|endoftext|> <bos> <pad>",
]  # short, empty, over the limit, special tokens as text
T = 12  # tokens per prompt in these tests


TOKENIZERS = {  # name: (transformers tokenizer, padding side its pipeline uses)
    "clip-l": (clip_tokenizer, "right"),  # pads with <|endoftext|>
    "clip-g": (lambda: clip_tokenizer(pad_token="!"), "right"),  # SD3's tokenizer_2 pads with "!"
    "t5": (t5_tokenizer, "right"),
    "gemma": (gemma_tokenizer, "right"),  # pipeline_sana.py sets padding_side = "right"
    "gemma-left": (gemma_tokenizer, "left"),  # the option, against Gemma's own default side
}


def runtime_tokenizer(hf, folder, max_length: int = T, padding_side: str = "right") -> TextTokenizer:
    return TextTokenizer(
        save_tokenizer(hf, folder), TokenizerConfig(max_length, hf.pad_token_id, padding_side)
    )


def pipeline_call(hf, prompts, max_length: int = T):
    """How every diffusers pipeline tokenizes (SD3, Flux, PixArt, Sana)."""
    return hf(prompts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_tokenizer_matches_transformers(name, tmp_path):
    build, side = TOKENIZERS[name]
    hf = build()
    hf.padding_side = side
    got, want = runtime_tokenizer(hf, tmp_path, padding_side=side)(PROMPTS), pipeline_call(hf, PROMPTS)
    assert got.input_ids.dtype == got.attention_mask.dtype == np.int64 and got.input_ids.shape == (
        len(PROMPTS),
        T,
    )
    assert got.input_ids.tolist() == want.input_ids
    assert got.attention_mask.tolist() == want.attention_mask
    # diffusers warns when the untruncated ids are longer than max_length
    assert list(got.lengths) == [len(ids) for ids in hf(PROMPTS).input_ids]
    assert got.truncated[:3] == (False, False, True) and got.max_length == T


def test_one_prompt_and_a_per_call_length_as_sana_needs(tmp_path):
    """Sana prefixes an instruction (CHI) to the prompt, padding to len(tokens(chi)) + 300 − 2 (pipeline_sana.py)."""
    hf = gemma_tokenizer()
    hf.padding_side = "right"
    ours = runtime_tokenizer(hf, tmp_path, max_length=8)
    chi = "Given a user prompt, generate an 'Enhanced prompt'\nUser Prompt: "
    assert ours(chi).lengths == (len(hf.encode(chi)),)
    limit = len(hf.encode(chi)) + 8 - 2
    got = ours([chi + p for p in PROMPTS], max_length=limit)
    assert got.input_ids.tolist() == pipeline_call(hf, [chi + p for p in PROMPTS], limit).input_ids
    assert ours(PROMPTS[0]).input_ids.tolist() == pipeline_call(hf, [PROMPTS[0]], 8).input_ids


def test_tokenizer_is_thread_safe(tmp_path):
    ours = runtime_tokenizer(clip_tokenizer(), tmp_path)
    lengths = (8, 12, 16)  # different limits at once: a per-call enable_truncation would race here
    want = {n: ours(PROMPTS, max_length=n).input_ids for n in lengths}

    def work(i):
        n = lengths[i % 3]
        return all(np.array_equal(ours(PROMPTS, max_length=n).input_ids, want[n]) for _ in range(200))

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(8)))


def test_saved_tokenizer_carries_no_padding_state(tmp_path):
    hf = t5_tokenizer()
    pipeline_call(hf, PROMPTS)  # transformers leaves padding/truncation enabled on its backend after a call
    saved = json.loads(save_tokenizer(hf, tmp_path / "tokenizer_3").read_text())
    assert saved["padding"] is None and saved["truncation"] is None


def test_slow_tokenizer_is_converted_or_refused(tmp_path):
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    (tmp_path / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "photo", "of", "cat"])
    )
    slow = type("BertTokenizer", (BertTokenizerLegacy,), {})(
        str(tmp_path / "vocab.txt")
    )  # transformers 4.x's name
    ours = runtime_tokenizer(slow, tmp_path / "converted", max_length=6)
    assert (
        ours(["a photo of a cat", "cat"]).input_ids.tolist()
        == pipeline_call(slow, ["a photo of a cat", "cat"], 6).input_ids
    )
    with pytest.raises(ConfigError, match="cannot convert BertTokenizerLegacy.*sentencepiece"):
        save_tokenizer(BertTokenizerLegacy(str(tmp_path / "vocab.txt")), tmp_path / "refused")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_length=0), "max_length 0"),
        (dict(pad_id=-1), "pad_id -1"),
        (dict(padding_side="middle"), "padding_side 'middle'"),
    ],
)
def test_tokenizer_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TokenizerConfig(**{"max_length": T, "pad_id": 0, **kwargs})


def test_tokenizer_errors(tmp_path):
    hf = clip_tokenizer()
    path = save_tokenizer(hf, tmp_path)
    with pytest.raises(ManifestError, match="missing.*re-export"):
        TextTokenizer(tmp_path / "nope.json", TokenizerConfig(T, 0))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ManifestError, match="bad.json.*cannot be read"):
        TextTokenizer(tmp_path / "bad.json", TokenizerConfig(T, 0))
    with pytest.raises(ConfigError, match="pad_id 100000 is outside"):
        TextTokenizer(path, TokenizerConfig(T, 100_000))
    with pytest.raises(
        ConfigError, match="max_length 2 leaves no room.*above 2, the special"
    ):  # CLIP: BOS + EOS
        TextTokenizer(path, TokenizerConfig(2, 0))
    ours = TextTokenizer(path, TokenizerConfig(T, hf.pad_token_id))
    with pytest.raises(ConfigError, match="max_length 1 leaves no room"):
        ours("a cat", max_length=1)
    for bad in ([], [None], ["a", 3]):
        with pytest.raises(InputError, match="non-empty list of strings"):
            ours(bad)


# Encoders: tiny random transformers models; inputs come from the runtime tokenizer (ORT) and from the
# transformers tokenizer (torch), so this is the whole text path of a pipeline. The reference calls the model as
# the diffusers pipeline does.
def clip_model(cls, tok, **kw):
    return cls(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            projection_dim=16,
            max_position_embeddings=77,
            bos_token_id=tok.bos_token_id,
            **kw,
        )
    )


def gemma_model(
    tok,
):  # sliding_window < T so both of Gemma-2's mask kinds are in the graph (Sana: 4096 > 300)
    return Gemma2Model(
        Gemma2Config(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=4,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=1,
        )
    )


ENCODERS = {  # name: (tokenizer, model, graph, reference as the pipeline computes it)
    # eos_token_id=2: the released CLIP-L config's legacy value, pooling at argmax(input_ids) = the EOS
    "sd3-clip": (
        lambda: clip_tokenizer(pad_token="!"),
        lambda tok: clip_model(CLIPTextModelWithProjection, tok, eos_token_id=2),
        lambda m: ClipGraph(m, T),
        lambda m, ids, mask: (m(ids, output_hidden_states=True).hidden_states[-2], m(ids)[0]),
    ),
    "flux-clip": (
        clip_tokenizer,
        lambda tok: clip_model(CLIPTextModel, tok, eos_token_id=tok.eos_token_id),
        lambda m: ClipGraph(m, T),
        lambda m, ids, mask: (m(ids, output_hidden_states=True).hidden_states[-2], m(ids).pooler_output),
    ),
    "pixart-t5": (
        t5_tokenizer,
        t5_model,
        lambda m: EncoderGraph(m, T, attention_mask=True),
        lambda m, ids, mask: (m(ids, attention_mask=mask)[0],),
    ),
    "sd3-flux-t5": (
        t5_tokenizer,
        t5_model,
        lambda m: EncoderGraph(m, T, attention_mask=False),
        lambda m, ids, mask: (m(ids)[0],),
    ),
    "sana-gemma2": (
        gemma_tokenizer,
        gemma_model,
        lambda m: EncoderGraph(m, T, attention_mask=True),
        lambda m, ids, mask: (m(ids, attention_mask=mask)[0],),
    ),
}
# fp32 on both sides; ORT fuses LayerNorm/GELU/MatMul+Add and sums in another order: rounding only (~1e-6 here)
ATOL = 1e-5


@pytest.mark.parametrize("name", ENCODERS)
def test_encoder_engine_matches_transformers(name, tmp_path):
    make_tok, make_model, make_graph, reference = ENCODERS[name]
    hf = make_tok()
    hf.padding_side = "right"
    torch.manual_seed(0)
    model = randomize(make_model(hf))
    graph = make_graph(model)
    export_onnx(graph, graph.inputs, graph.outputs, tmp_path / "text_encoder.onnx")
    session = ort.InferenceSession(str(tmp_path / "text_encoder.onnx"))
    assert [i.name for i in session.get_inputs()] == [s.name for s in graph.inputs]
    assert [o.name for o in session.get_outputs()] == [s.name for s in graph.outputs]
    ours = runtime_tokenizer(hf, tmp_path)
    for prompts in (PROMPTS[:1], [PROMPTS[2], PROMPTS[0]]):  # batch 1 (padded); batch 2 (truncated, padded)
        tokens, want = ours(prompts), pipeline_call(hf, prompts)
        with torch.no_grad():
            ref = reference(model, torch.tensor(want.input_ids), torch.tensor(want.attention_mask))
        feeds = {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}
        got = session.run(None, {s.name: feeds[s.name] for s in graph.inputs})
        for spec, r, o in zip(graph.outputs, ref, got):
            assert o.shape == r.shape
            np.testing.assert_allclose(o, r.numpy(), rtol=0, atol=ATOL, err_msg=f"{name}: {spec.name}")


def test_encoder_graph_errors():
    tok = clip_tokenizer()
    with pytest.raises(
        ConfigError, match="got a CLIPTextModel; this graph wraps T5EncoderModel, Gemma2Model"
    ):
        EncoderGraph(clip_model(CLIPTextModel, tok), T, attention_mask=False)
    with pytest.raises(ConfigError, match="seq_len 78 exceeds.*max_position_embeddings 77"):
        ClipGraph(clip_model(CLIPTextModel, tok), 78)
    with pytest.raises(ConfigError, match="seq_len 0 must be"):
        ClipGraph(clip_model(CLIPTextModel, tok), 0)
    with pytest.raises(ConfigError, match="dtype torch.float64 is not exportable"):
        ClipGraph(clip_model(CLIPTextModel, tok).double(), T)
