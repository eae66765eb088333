"""The inference API: Translator (batching, order, empty and over-long lines, n-best, files, loading)
and LanguageModel (seeded generation, stop strings, perplexity)."""

import io
import logging
import math
import random
import sys

import pytest
import torch

from transformer.config import Config, DataConfig, DecodeConfig, ModelConfig
from transformer.data.vocab import BOS_ID, EOS_ID, PAD_ID
from transformer.decoding import beam_search
from transformer.errors import TransformerError
from transformer.inference import LanguageModel, Translation, Translator, token_batches, translate_file
from transformer.model import build_model

WORDS = ["<pad>", "<unk>", "<s>", "</s>"] + "the cat sat on a mat and saw dogs by house tree river stone".split()
TINY = ModelConfig(d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2, dropout=0.0,
                   max_positions=32, final_logits_bias=True)


class WordTokenizer:
    """One id per word; unknown words are UNK."""

    ids = {w: i for i, w in enumerate(WORDS)}

    def encode_src(self, text):
        return [self.ids.get(w, 1) for w in text.split()]

    encode_tgt = encode_src

    def decode_tgt(self, ids):
        return " ".join(WORDS[i] for i in ids if i not in (PAD_ID, BOS_ID, EOS_ID))

    decode_src = decode_tgt


def tiny_model(cfg=TINY, vocab=len(WORDS), seed=0):
    torch.manual_seed(seed)
    return build_model(cfg, vocab).eval()


def sentences(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS[4:]) for _ in range(rng.randint(1, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def translator():
    return Translator(tiny_model(), WordTokenizer(), DecodeConfig(beam=3, max_len_b=10))


def test_token_batches():
    lengths = [3, 10, 1, 7, 7, 2]
    batches = token_batches(lengths, max_tokens=14)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 14
    assert batches[0] == [1]  # longest first
    assert token_batches([50], 10) == [[0]]  # over-long items still get a batch


def test_translate_keeps_input_order_and_ignores_batching(translator):
    src = sentences(12)
    one_batch = translator.translate(src, max_tokens=10_000)
    small_batches = translator.translate(src, max_tokens=16)
    alone = [translator.translate([s])[0] for s in src]
    assert one_batch == small_batches == alone
    assert len(set(one_batch)) > 1


def test_greedy_is_beam_one(translator):
    src = sentences(6, seed=1)
    expected = []
    for s in src:
        (hyps,) = beam_search(translator.model, torch.tensor([translator.encode([s])[0]]), beam=1, max_len_b=10)
        expected.append(" ".join(WORDS[t] for t in hyps[0].tokens))
    assert translator.translate(src, beam=1) == expected


def test_cpu_searches_run_on_a_frozen_copy_with_the_models_outputs(translator):
    from transformer.model.frozen import FrozenLM, FrozenTransformer

    assert isinstance(translator.search_model, FrozenTransformer)
    live = Translator(translator.model, WordTokenizer(), translator.cfg, freeze=False)
    assert live.search_model is live.model
    src = sentences(10, seed=4)
    for beam in (1, 3):
        frozen, reference = (t.translate_nbest(src, beam=beam, nbest=beam) for t in (translator, live))
        assert [[h.text for h in n] for n in frozen] == [[h.text for h in n] for n in reference]
        assert [h.score for n in frozen for h in n] == pytest.approx([h.score for n in reference for h in n], rel=1e-5)
    lm = LanguageModel(tiny_model(LM_CFG), WordTokenizer(), DecodeConfig(max_new_tokens=15))
    assert isinstance(lm.search_model, FrozenLM)
    live_lm = LanguageModel(lm.model, WordTokenizer(), lm.cfg, freeze=False)
    assert lm.generate("the cat", seed=3) == live_lm.generate("the cat", seed=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_cuda_searches_replay_cuda_graphs_with_the_models_outputs(dtype):
    from transformer.model.frozen import FrozenTransformer

    graphed = Translator(tiny_model(), WordTokenizer(), DecodeConfig(beam=3, max_len_b=10), device="cuda", dtype=dtype)
    assert isinstance(graphed.search_model, FrozenTransformer) and graphed.search_model.static is not None
    live = Translator(graphed.model, WordTokenizer(), graphed.cfg, freeze=False)
    src = sentences(40, seed=5)
    for beam in (1, 3):
        ours, reference = (t.translate_nbest(src, beam=beam, nbest=beam) for t in (graphed, live))
        same = sum([h.text for h in a] == [h.text for h in b] for a, b in zip(ours, reference))
        assert same == len(src) if dtype is None else same >= 0.9 * len(src)  # bf16 rounds in other places
    assert graphed.search_model.static.recorded > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generation_replays_cuda_graphs_with_the_models_outputs():
    from transformer.model.frozen import FrozenLM

    graphed = LanguageModel(tiny_model(LM_CFG), WordTokenizer(), DecodeConfig(max_new_tokens=15), device="cuda")
    assert isinstance(graphed.search_model, FrozenLM) and graphed.search_model.static is not None
    live = LanguageModel(graphed.model, WordTokenizer(), graphed.cfg, freeze=False)
    for seed in range(3):
        assert graphed.generate("the cat", seed=seed) == live.generate("the cat", seed=seed)
    assert graphed.generate("the cat", temperature=0.0) == live.generate("the cat", temperature=0.0)


def test_threads_take_turns_on_a_static_cache_model():
    # A static-cache (CUDA graph) model holds one set of buffers: concurrent translate calls must take turns.
    from concurrent.futures import ThreadPoolExecutor

    from transformer.model import freeze

    shared = Translator(tiny_model(), WordTokenizer(), DecodeConfig(beam=2, max_len_b=10), freeze=False)
    reference = [shared.translate(sentences(6, seed=s), max_tokens=20) for s in range(8)]
    shared.search_model = freeze(shared.model, graphs=True)  # the static step, eager on the CPU
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda s: shared.translate(sentences(6, seed=s), max_tokens=20), range(8)))
    assert results == reference


def test_nbest(translator):
    src = sentences(4, seed=2)
    nbest = translator.translate_nbest(src, nbest=3)
    assert [len(h) for h in nbest] == [3, 3, 3, 3]
    for hyps in nbest:
        assert all(isinstance(h, Translation) for h in hyps)
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    assert [h[0].text for h in nbest] == translator.translate(src)
    with pytest.raises(TransformerError, match="nbest"):
        translator.translate_nbest(src, nbest=5, beam=4)


def test_length_penalty_form_reaches_the_scores(translator):
    src = sentences(3, seed=4)
    for beam in (1, 3):
        power = translator.translate_nbest(src, beam=beam, length_penalty=0.5, length_penalty_form="power")
        for hyps in power:
            for h in hyps:
                n = len(translator.tokenizer.encode_tgt(h.text)) + 1 if h.text else 1  # output tokens with EOS
                assert h.score == pytest.approx(h.logprob / n ** 0.5, rel=1e-5)
    with pytest.raises(TransformerError, match="length penalty form"):
        translator.translate(src, length_penalty_form="wu")


def test_empty_lines_give_empty_output_in_order(translator):
    src = ["the cat sat", "", "a dog", "   ", "house"]
    out = translator.translate(src)
    assert out[1] == "" and out[3] == ""
    assert [out[0], out[2], out[4]] == translator.translate([src[0], src[2], src[4]])
    assert translator.translate(["", ""]) == ["", ""]
    assert translator.translate([]) == []


def test_long_lines_are_truncated_with_a_warning(caplog):
    t = Translator(tiny_model(), WordTokenizer(), DecodeConfig(beam=2, max_len_b=5, max_input_len=6))
    long = "the cat sat on a mat and saw dogs"
    with caplog.at_level(logging.WARNING, logger="transformer.inference"):
        out = t.translate(["a cat", long])
    assert "truncated to 6 tokens" in caplog.text and "line 2" in caplog.text
    assert out[1] == t.translate(["the cat sat on a"])[0]  # 5 words + EOS
    # Without max_input_len the model's max_positions (32) is the limit.
    t2 = Translator(tiny_model(), WordTokenizer(), DecodeConfig(beam=2, max_len_b=5))
    assert t2.max_input_len == 32
    assert len(t2.translate([" ".join(["cat"] * 100)])) == 1


def test_long_lines_rejected_when_configured():
    t = Translator(tiny_model(), WordTokenizer(), DecodeConfig(max_input_len=4, long_input="error"))
    with pytest.raises(TransformerError, match="line 2 has 6 tokens"):
        t.translate(["a cat", "the cat sat on a"])
    with pytest.raises(TransformerError, match="long_input"):
        Translator(tiny_model(), WordTokenizer(), DecodeConfig(long_input="drop"))


def test_output_length_is_capped_by_max_positions():
    t = Translator(tiny_model(), WordTokenizer(), DecodeConfig(beam=2, max_len_b=1000))
    with torch.no_grad():
        t.model.output.final_logits_bias[EOS_ID] = -100.0  # never stops by itself
    (out,) = t.translate(["the cat"])
    assert len(out.split()) == TINY.max_positions - 1  # + EOS = max_positions


def test_translate_file(tmp_path, translator):
    src = sentences(7, seed=3) + [""]
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(src) + "\n", encoding="utf-8")
    out = tmp_path / "sub" / "out.txt"
    assert translate_file(translator, inp, out, progress=False, buffer_lines=3) == 8
    assert out.read_text(encoding="utf-8").split("\n")[:-1] == translator.translate(src)
    out_nbest = tmp_path / "nbest.txt"
    translate_file(translator, inp, out_nbest, nbest=2, progress=False)
    lines = out_nbest.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 7 * 2 + 1
    assert lines[0].split("\t")[0] == "1" and float(lines[0].split("\t")[1]) <= 0
    with pytest.raises(TransformerError, match="does not exist"):
        translate_file(translator, tmp_path / "missing.txt", out)


def test_translate_stdin_to_stdout(monkeypatch, capsys, translator):
    src = sentences(3, seed=4)
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(src) + "\n"))
    assert translate_file(translator, "-", None) == 3
    assert capsys.readouterr().out.split("\n")[:-1] == translator.translate(src)


# --- loading ----------------------------------------------------------------------------------------


def test_load_missing_path(tmp_path):
    with pytest.raises(TransformerError, match="does not exist"):
        Translator.load(tmp_path / "nope")
    with pytest.raises(TransformerError, match="does not exist"):
        LanguageModel.load(tmp_path / "nope")


def _write_run(run_dir, model_cfg):
    from transformer.data.tokenizer import Tokenizer
    from transformer.training.checkpoint import config_dict, save_checkpoint

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS[4:]) for _ in range(8)) for _ in range(300)]
    tok = Tokenizer.train(texts, vocab_size=300, out_dir=run_dir / "tokenizer", num_threads=1)
    cfg = Config(model=model_cfg, data=DataConfig(dataset="bible" if model_cfg.arch == "transformer" else "text"),
                 decode=DecodeConfig(beam=2, max_len_b=8))
    model = tiny_model(model_cfg, tok.src_vocab_size)
    state = {"config": config_dict(cfg), "src_vocab_size": tok.src_vocab_size,
             "tgt_vocab_size": tok.tgt_vocab_size, "shared_vocab": True}
    save_checkpoint(run_dir / "checkpoints" / "step_00000001", model, state)
    return model, tok


def test_load_run_and_corrupt_checkpoint(tmp_path):
    pytest.importorskip("transformer.training.checkpoint")
    model, tok = _write_run(tmp_path / "run", TINY)
    loaded = Translator.load(tmp_path / "run")
    assert loaded.cfg.beam == 2  # the run's decode section
    src = ["the cat sat on a mat", "a dog by the river"]
    assert loaded.translate(src) == Translator(model, tok, loaded.cfg).translate(src)
    with pytest.raises(TransformerError, match="load it with Translator"):
        LanguageModel.load(tmp_path / "run")
    weights = tmp_path / "run" / "checkpoints" / "step_00000001" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(TransformerError, match="corrupt"):
        Translator.load(tmp_path / "run")


def test_load_run_quantized_int8(tmp_path):
    pytest.importorskip("transformer.training.checkpoint")
    _write_run(tmp_path / "run", TINY)
    float_model = Translator.load(tmp_path / "run")
    int8 = Translator.load(tmp_path / "run", quantize="int8")
    assert not any(type(m) is torch.nn.Linear for m in int8.model.modules())
    out = int8.translate(["the cat sat on a mat", "", "a dog by the river"])
    assert len(out) == 3 and out[1] == ""
    assert any(type(m) is torch.nn.Linear for m in float_model.model.modules())
    with pytest.raises(TransformerError, match="unknown quantisation"):
        Translator.load(tmp_path / "run", quantize="fp4")


def test_load_run_in_bf16(tmp_path):
    # dtype="bf16" is the GPU's inference path; on this CPU it runs (slowly), and must decode like float32
    # up to bf16 rounding: the same outputs on this tiny model, and scores still float32.
    pytest.importorskip("transformer.training.checkpoint")
    _write_run(tmp_path / "run", TINY)
    fp32 = Translator.load(tmp_path / "run")
    bf16 = Translator.load(tmp_path / "run", dtype="bf16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    sources = ["the cat sat on a mat", "", "a dog by the river"]
    assert bf16.translate(sources, beam=1) == fp32.translate(sources, beam=1)
    hyps = bf16.translate_nbest(sources[:1], beam=2, nbest=2)[0]
    assert all(isinstance(h.score, float) and h.score == h.score for h in hyps)
    with pytest.raises(TransformerError, match="dtype 'fp8' is not one of"):
        Translator.load(tmp_path / "run", dtype="fp8")
    with pytest.raises(TransformerError, match="either a dtype or"):
        Translator.load(tmp_path / "run", dtype="bf16", quantize="int8")


# --- language model ---------------------------------------------------------------------------------

LM_CFG = ModelConfig(arch="lm", d_model=32, n_heads=4, d_ff=64, n_decoder_layers=2, dropout=0.0, max_positions=24)


@pytest.fixture(scope="module")
def lm():
    return LanguageModel(tiny_model(LM_CFG), WordTokenizer(), DecodeConfig(max_new_tokens=15))


def test_generate_seeded_reproducible(lm):
    a = lm.generate("the cat", seed=1)
    assert a == lm.generate("the cat", seed=1)
    assert a != lm.generate("the cat", seed=2) or a != lm.generate("the cat", seed=3)
    assert len(a.split()) <= 15
    greedy = lm.generate("the cat", temperature=0)
    assert greedy == lm.generate("the cat", temperature=0, seed=5)


def test_generate_stop_strings(lm):
    full = lm.generate("the cat", seed=1, max_new_tokens=15)
    word = full.split()[2]
    cut = lm.generate("the cat", seed=1, max_new_tokens=15, stop=[word, "zzz"])
    assert cut == full[: full.index(word)]


def test_generate_long_prompt_and_limits(lm):
    out = lm.generate(" ".join(["cat"] * 40), seed=0, max_new_tokens=100)
    assert len(out.split()) <= 1  # the prompt fills the positions but one
    with pytest.raises(TransformerError):
        lm.generate("a", top_p=0)


def test_perplexity_matches_the_definition(lm):
    text = "the cat sat on a mat"
    ids = [BOS_ID] + WordTokenizer().encode_src(text) + [EOS_ID]
    with torch.no_grad():
        logprobs = torch.log_softmax(lm.model(torch.tensor([ids[:-1]])), dim=-1)[0]
    nll = -sum(float(logprobs[i, t]) for i, t in enumerate(ids[1:]))
    score = lm.score(text)
    assert score["tokens"] == len(ids) - 1
    assert score["nll"] == pytest.approx(nll, rel=1e-5)
    assert lm.perplexity(text) == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)
    # longer than max_positions: scored in windows, still finite
    assert math.isfinite(lm.perplexity(" ".join(["cat"] * 60)))
