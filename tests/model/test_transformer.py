"""Invariants of Transformer and TransformerLM: causality, padding, cached = uncached, sizes, tying, limits."""

import copy
import math
from dataclasses import replace

import pytest
import torch

from transformer.config import PRESETS, ModelConfig
from transformer.data.vocab import BOS_ID, EOS_ID, PAD_ID
from transformer.errors import TransformerError
from transformer.model import Transformer, TransformerLM, build_model, count_parameters
from transformer.model.embeddings import dense_tied_gradients, sinusoidal_table, tied_uses

V = 50
TINY = ModelConfig(
    d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2, dropout=0.1, max_positions=64
)
VARIANTS = [
    pytest.param(dict(norm_first=False, positional="sinusoidal"), id="post-ln-sinusoidal"),
    pytest.param(dict(norm_first=True, positional="sinusoidal"), id="pre-ln-sinusoidal"),
    pytest.param(dict(norm_first=False, positional="learned"), id="post-ln-learned"),
    pytest.param(dict(norm_first=True, positional="learned", final_logits_bias=True), id="pre-ln-learned-bias"),
]


def _transformer(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(replace(TINY, **overrides), V, V).eval()


def _lm(**overrides) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(replace(TINY, arch="lm", **overrides), V).eval()


def _tokens(b: int, t: int, first: int = 4) -> torch.Tensor:
    """Random non-special tokens (B,T)."""
    return torch.randint(first, V, (b, t))


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> bool:
    return torch.allclose(a, b, atol=atol, rtol=0)


# --- causality ---------------------------------------------------------------------------------------


@torch.no_grad()
def test_future_targets_do_not_change_past_logits():
    model = _transformer()
    src, tgt = _tokens(2, 6), _tokens(2, 8)
    changed = tgt.clone()
    changed[:, 5:] = _tokens(2, 3)
    a, b = model(src, tgt), model(src, changed)
    assert _close(a[:, :5], b[:, :5])
    assert not _close(a[:, 5:], b[:, 5:])  # the change is visible where it should be


@torch.no_grad()
def test_future_tokens_do_not_change_past_lm_logits():
    model = _lm()
    x = _tokens(2, 8)
    changed = x.clone()
    changed[:, 5:] = _tokens(2, 3)
    a, b = model(x), model(changed)
    assert _close(a[:, :5], b[:, :5])
    assert not _close(a[:, 5:], b[:, 5:])


# --- padding -----------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs_do_not_depend_on_batch_neighbours(variant):
    model = _transformer(**variant)
    short_src, long_src = torch.tensor([[5, 6, 7, EOS_ID]]), _tokens(1, 9)
    short_tgt, long_tgt = torch.tensor([[BOS_ID, 8, 9]]), _tokens(1, 7)
    src = torch.cat([torch.nn.functional.pad(short_src, (0, 5), value=PAD_ID), long_src])  # (2,9)
    tgt = torch.cat([torch.nn.functional.pad(short_tgt, (0, 4), value=PAD_ID), long_tgt])  # (2,7)
    batched = model(src, tgt)
    alone = model(short_src, short_tgt)
    assert _close(batched[0, :3], alone[0])
    assert _close(batched[1], model(long_src, long_tgt)[0])


@torch.no_grad()
def test_lm_outputs_do_not_depend_on_batch_neighbours():
    model = _lm()
    short, long = torch.tensor([[BOS_ID, 5, 6]]), _tokens(1, 8)
    batched = model(torch.cat([torch.nn.functional.pad(short, (0, 5), value=PAD_ID), long]))
    assert _close(batched[0, :3], model(short)[0])


# --- cached incremental decoding ---------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_equals_full_recompute(variant):
    model = _transformer(**variant)
    src = torch.tensor([[5, 6, 7, 8, 9, EOS_ID], [10, 11, EOS_ID, PAD_ID, PAD_ID, PAD_ID]])
    tgt = _tokens(2, 20)  # longer than the cache's first allocation (16), so it grows
    enc = model.encode(src)
    cache = model.new_cache()
    full = model.decode(tgt, enc)
    for t in range(tgt.size(1)):
        step = model.decode(tgt[:, t : t + 1], enc, cache)  # (B,1,V)
        assert _close(step[:, 0], full[:, t]), f"step {t}"
    assert cache.length == tgt.size(1)


@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_lm_decoding_equals_full_recompute(variant):
    model = _lm(**variant)
    x = _tokens(3, 21)
    full = model(x)
    cache = model.new_cache()
    prefill = model.decode(x[:, :5], cache)  # several tokens at once, then single steps, then a chunk
    assert _close(prefill, full[:, :5])
    for t in range(5, 17):
        assert _close(model.decode(x[:, t : t + 1], cache)[:, 0], full[:, t]), f"step {t}"
    assert _close(model.decode(x[:, 17:], cache), full[:, 17:])


@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS[:2])
def test_cache_reorder_matches_recompute_on_reordered_batch(variant):
    model = _transformer(**variant)
    src = torch.tensor([[5, 6, 7, EOS_ID], [8, 9, EOS_ID, PAD_ID], [10, EOS_ID, PAD_ID, PAD_ID]])
    tgt = _tokens(3, 6)
    enc, cache = model.encode(src), model.new_cache()
    model.decode(tgt[:, :4], enc, cache)
    new_order = torch.tensor([2, 0, 0, 1])  # as beam search does: drop, keep and repeat rows
    cache.reorder(new_order)
    enc = enc.reorder(new_order)
    reordered = tgt[new_order]
    for t in (4, 5):
        step = model.decode(reordered[:, t : t + 1], enc, cache)[:, 0]
        assert _close(step, model(src[new_order], reordered[:, : t + 1])[:, t])


@torch.no_grad()
def test_lm_cache_reorder():
    model = _lm()
    x = _tokens(2, 7)
    cache = model.new_cache()
    model.decode(x[:, :5], cache)
    new_order = torch.tensor([1, 1, 0])
    cache.reorder(new_order)
    for t in (5, 6):
        step = model.decode(x[new_order, t : t + 1], cache)[:, 0]
        assert _close(step, model(x[new_order, : t + 1])[:, t])


# --- sizes, tying, limits ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, paper", [("base", 65e6), ("big", 213e6)])
def test_parameter_counts_match_the_paper(name, paper):
    with torch.device("meta"):  # no memory, no initialisation cost
        model = build_model(PRESETS[name], 37_000, 37_000)
    n = count_parameters(model)
    assert abs(n - paper) / paper <= 0.05, f"{name}: {n:,} parameters"


def test_three_way_tying_shares_one_tensor():
    model = Transformer(TINY, V, V)
    w = model.encoder.embed_tokens.weight
    assert model.decoder.embed_tokens.weight is w and model.output.lm_head.weight is w
    n_separate = count_parameters(Transformer(replace(TINY, tie_embeddings=False), V, V))
    assert n_separate - count_parameters(model) == 2 * V * TINY.d_model


def test_separate_vocabularies_tie_only_target_embedding_and_lm_head():
    model = Transformer(TINY, 40, 60)
    assert model.output.lm_head.weight is model.decoder.embed_tokens.weight
    assert model.encoder.embed_tokens.weight is not model.decoder.embed_tokens.weight
    assert model.encoder.embed_tokens.weight.shape == (40, TINY.d_model)
    assert model(_tokens(1, 3, first=4) % 40, _tokens(1, 2)).shape == (1, 2, 60)
    explicit = Transformer(TINY, V, V, shared_vocab=False)  # equal sizes, but two vocabularies
    assert explicit.encoder.embed_tokens.weight is not explicit.decoder.embed_tokens.weight
    assert explicit.output.lm_head.weight is explicit.decoder.embed_tokens.weight


def test_lm_ties_embedding_and_lm_head():
    model = TransformerLM(replace(TINY, arch="lm"), V)
    assert model.output.lm_head.weight is model.decoder.embed_tokens.weight


@torch.no_grad()
def test_sequences_longer_than_max_positions_raise():
    model = _transformer(max_positions=8)
    with pytest.raises(TransformerError, match="max_positions"):
        model(_tokens(1, 9), _tokens(1, 3))
    with pytest.raises(TransformerError, match="max_positions"):
        model(_tokens(1, 3), _tokens(1, 9))
    enc, cache = model.encode(_tokens(1, 3)), model.new_cache()
    model.decode(_tokens(1, 8), enc, cache)
    with pytest.raises(TransformerError, match="max_positions"):
        model.decode(_tokens(1, 1), enc, cache)  # the 9th position, one step at a time
    with pytest.raises(TransformerError, match="max_positions"):
        _lm(max_positions=8)(_tokens(1, 9))


# --- embeddings and dropout --------------------------------------------------------------------------


def test_sinusoidal_table_follows_the_paper():
    d = 16
    table = sinusoidal_table(50, d)
    for pos in (0, 7, 49):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


@torch.no_grad()
def test_embeddings_are_scaled_by_sqrt_d_model():
    model = _transformer(dropout=0.0)
    tokens = torch.tensor([[7]])
    x = model.encoder.embed_positions(model.encoder.embed_tokens(tokens))
    expected = model.encoder.embed_tokens.weight[7] * math.sqrt(TINY.d_model) + sinusoidal_table(1, TINY.d_model)[0]
    assert _close(x[0, 0], expected)


def _backward_nodes(t: torch.Tensor) -> set[str]:
    """Names of the autograd nodes behind ``t``."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("kind", ["three-way", "separate-vocabularies", "lm"])
def test_tied_gradients_added_in_place_equal_autograd_sum(kind):
    torch.manual_seed(0)
    cfg = replace(TINY, dropout=0.0)
    if kind == "lm":
        model = TransformerLM(replace(cfg, arch="lm"), V).train()
    else:
        model = Transformer(cfg, V, 40 if kind == "separate-vocabularies" else V).train()
    src = _tokens(3, 6)
    src[0, -2:] = PAD_ID
    src[1, :3] = 9  # a token repeated: its rows' gradients add up
    tgt = _tokens(3, 5) % (V if kind != "separate-vocabularies" else 40)
    tgt[2, -1] = PAD_ID
    tgt[0, :2] = 9

    def gradients(dense: bool) -> tuple[dict[str, torch.Tensor], set[str]]:
        model.zero_grad(set_to_none=True)
        with dense_tied_gradients() if dense else torch.enable_grad():
            logits = model(tgt) if kind == "lm" else model(src, tgt)
        torch.manual_seed(1)
        (logits * torch.randn_like(logits)).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, _backward_nodes(logits)

    ours, ours_nodes = gradients(dense=False)
    reference, reference_nodes = gradients(dense=True)
    assert "_TiedUsesBackward" in ours_nodes and "_TiedUsesBackward" not in reference_nodes
    assert ours.keys() == reference.keys()
    for name in ours:
        assert not ours[name].is_sparse
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-5, atol=1e-5, msg=name)
    assert model.decoder.embed_tokens.weight.grad[9].abs().sum() > 0  # the reference's, of the repeated token


def test_tied_uses_only_where_a_gradient_is_recorded():
    w = torch.randn(V, 8, requires_grad=True)
    assert tied_uses(w.detach(), 3) is None and tied_uses(w, 1) is None
    with torch.no_grad():
        assert tied_uses(w, 3) is None
    with dense_tied_gradients():
        assert tied_uses(w, 3) is None
    aliases = tied_uses(w, 3)
    assert len(aliases) == 3 and all(a.shape == w.shape and torch.equal(a, w) for a in aliases)
    (aliases[1] * 2).sum().backward()  # one alias used, two not: their gradients are None, not zeros
    assert torch.equal(w.grad, torch.full_like(w, 2.0))


@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS)
def test_inference_output_projection_equals_training_one_and_follows_weight_updates(variant):
    # Without autograd on the CPU the output layer multiplies by a cached transposed copy of the weight
    # (faster there); it must give the training path's logits, and notice when the weight changes.
    model = _transformer(**variant)
    src, tgt = _tokens(3, 7), _tokens(3, 5)
    with torch.enable_grad():
        reference = model(src, tgt).detach()
    with torch.no_grad():
        assert _close(model(src, tgt), reference)
        model.output.lm_head.weight.mul_(2.0)  # an in-place update (as an optimizer or load_state_dict does)
    with torch.enable_grad():
        reference = model(src, tgt).detach()
    with torch.inference_mode():
        assert _close(model(src, tgt), reference)
    with torch.no_grad():  # the copy made under inference_mode serves outside it too
        assert _close(model(src, tgt), reference)


def test_inference_output_projection_sees_fused_optimizer_updates():
    # A fused Adam step changes the weights without bumping their version counter; the trainer validates
    # between steps (train -> eval -> train), so the cached copy must not outlive a mode change.
    model = _transformer()
    src, tgt = _tokens(3, 7), _tokens(3, 5)
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    for _ in range(2):
        model.eval()
        with torch.no_grad():
            cached = model(src, tgt)
        with torch.enable_grad():
            assert _close(cached, model(src, tgt).detach())
        model.train()
        model(src, tgt).logsumexp(-1).sum().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        cached = model(src, tgt)
    with torch.enable_grad():
        assert _close(cached, model(src, tgt).detach())


def test_dropout_only_in_train_mode():
    model = _transformer(dropout=0.3, attention_dropout=0.1, activation_dropout=0.1)
    src, tgt = _tokens(2, 6), _tokens(2, 5)
    eval_a, eval_b = model(src, tgt), model(src, tgt)
    assert torch.equal(eval_a, eval_b)
    model.train()
    train_a, train_b = model(src, tgt), model(src, tgt)
    assert not torch.equal(train_a, train_b)
    assert not _close(train_a, eval_a)


# --- the same training step on CUDA -------------------------------------------------------------------

# The autograd nodes of training's CPU kernels (the compiled extension's, where it is built); on CUDA a step
# runs PyTorch's own ops instead
CPU_KERNEL_NODES = {"_AddNormBackward", "_ShortAttentionBackward", "_PackedShortAttentionBackward",
                    "_ReluFeedForwardBackward", "_HashedDropoutBackward"}
CUDA_KINDS = [pytest.param(dict(norm_first=False), id="post-ln"), pytest.param(dict(norm_first=True), id="pre-ln"),
              pytest.param(dict(arch="lm", norm_first=True), id="lm")]


def _cuda_pair(dropout: float, **overrides):
    """One model on the CPU and its copy on CUDA, with a head size that the CPU's attention kernel takes."""
    torch.manual_seed(0)
    cfg = replace(TINY, d_model=64, n_heads=2, d_ff=128, dropout=dropout, **overrides)
    model = (TransformerLM(cfg, V) if cfg.arch == "lm" else Transformer(cfg, V, V)).train()
    return model, copy.deepcopy(model).cuda()


def _loss_step(model, src: torch.Tensor, tgt: torch.Tensor, device: str, bf16: bool = False):
    """(loss, gradients by name, autograd node names) of one label-smoothed step, all on the CPU."""
    from transformer.training.loss import label_smoothed_nll_loss

    model.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
        tgt_in = tgt[:, :-1].to(device)
        logits = model(tgt_in) if isinstance(model, TransformerLM) else model(src.to(device), tgt_in)
    loss, _ = label_smoothed_nll_loss(logits, tgt[:, 1:].to(device), 0.1)
    loss.backward()
    return loss.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()}, _backward_nodes(loss)


def _cuda_batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    src, tgt = _tokens(4, 9), _tokens(4, 8)
    src[1, -3:] = PAD_ID
    tgt[2, -2:] = PAD_ID
    return src, tgt


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", CUDA_KINDS)
def test_cuda_training_step_equals_the_cpu_one(kind, monkeypatch):
    # Without dropout the CPU's kernels (where the extension is built) and CUDA's ops compute the same step
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cpu, gpu = _cuda_pair(0.0, **kind)
    src, tgt = _cuda_batch()
    cpu_loss, cpu_grads, cpu_nodes = _loss_step(cpu, src, tgt, "cpu")
    gpu_loss, gpu_grads, gpu_nodes = _loss_step(gpu, src, tgt, "cuda")
    assert not gpu_nodes & CPU_KERNEL_NODES
    from transformer.model import attention

    if attention._KERNEL.get() is not None:  # the extension is built and runs here: the comparison is with it
        assert cpu_nodes & CPU_KERNEL_NODES
    torch.testing.assert_close(gpu_loss, cpu_loss, rtol=1e-5, atol=1e-5)
    assert gpu_grads.keys() == cpu_grads.keys()
    for name in cpu_grads:
        torch.testing.assert_close(gpu_grads[name], cpu_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", CUDA_KINDS)
def test_cuda_training_step_with_dropout_and_bf16_autocast(kind):
    _, gpu = _cuda_pair(0.1, **kind)
    src, tgt = _cuda_batch()
    first, _, _ = _loss_step(gpu, src, tgt, "cuda")
    second, grads, _ = _loss_step(gpu, src, tgt, "cuda")
    assert first != second  # dropout draws new masks each step
    gpu.eval()
    fp32, fp32_grads, _ = _loss_step(gpu, src, tgt, "cuda")
    assert torch.equal(_loss_step(gpu, src, tgt, "cuda")[0], fp32)  # no dropout: the same loss twice
    bf16, bf16_grads, _ = _loss_step(gpu, src, tgt, "cuda", bf16=True)
    torch.testing.assert_close(bf16, fp32, rtol=2e-2, atol=2e-2)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in bf16_grads.values())
    flat_bf16, flat_fp32 = (torch.cat([g.flatten() for g in gs.values()]) for gs in (bf16_grads, fp32_grads))
    assert torch.nn.functional.cosine_similarity(flat_bf16, flat_fp32, dim=0) > 0.99  # some tensors' are ~0 (k bias)
