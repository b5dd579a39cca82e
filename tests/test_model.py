"""The one decoder: causality, sizes, and logits equal to independent implementations."""

from __future__ import annotations

import pytest
import torch

from modules.nn import Decoder, DecoderConfig

TINY = dict(vocab_size=97, block_size=16, n_layer=2, n_head=4, n_embd=32)


def tiny(**overrides) -> Decoder:
    torch.manual_seed(0)
    return Decoder(DecoderConfig(**{**TINY, **overrides})).eval()


VARIANTS = {
    "gpt2": {},
    "llama": dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False, tie_embeddings=False),
    "gqa": dict(n_kv_head=2, position="rope"),
    "mqa": dict(n_kv_head=1),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_changing_a_future_token_leaves_past_logits_unchanged(variant: str) -> None:
    model = tiny(**VARIANTS[variant])
    x = torch.randint(0, 97, (2, 16))
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % 97
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_gpt2_124m_parameter_count() -> None:
    # GPT-2 small as released: 124,439,808 parameters (tied embeddings, biases, 50,257 tokens).
    model = Decoder(DecoderConfig())
    assert model.num_params() == 124_439_808
    # nanoGPT's benchmark configuration (no bias, vocab padded to 50,304) prints 123.59M
    # without position embeddings.
    nano = Decoder(DecoderConfig(vocab_size=50304, bias=False))
    assert nano.num_params() - nano.wpe.weight.numel() == 123_587_328


def test_flops_per_token_follows_palm_formula() -> None:
    cfg = DecoderConfig(**TINY)
    model = Decoder(cfg)
    n = model.num_params(exclude_embeddings=True) + cfg.vocab_size * cfg.n_embd
    assert model.flops_per_token() == 6 * n + 12 * 2 * 4 * 8 * 16


def test_gpt2_initialisation_scales_residual_projections() -> None:
    model = Decoder(DecoderConfig(n_layer=12, n_embd=768, vocab_size=1000, block_size=64))
    std = model.blocks[0].attn.proj.weight.std().item()
    assert std == pytest.approx(0.02 / (2 * 12) ** 0.5, rel=0.05)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_grouped_query_attention_equals_multi_head_with_repeated_kv_heads() -> None:
    gqa = tiny(n_kv_head=2)
    mha = tiny()
    mha.load_state_dict({k: v for k, v in gqa.state_dict().items() if "qkv" not in k}, strict=False)
    C, hs = 32, 8
    for g_block, m_block in zip(gqa.blocks, mha.blocks):
        q, k, v = g_block.attn.qkv.weight.split([C, 2 * hs, 2 * hs])
        qb, kb, vb = g_block.attn.qkv.bias.split([C, 2 * hs, 2 * hs])
        rep = lambda w: w.view(2, hs, *w.shape[1:]).repeat_interleave(2, dim=0).reshape(C, *w.shape[1:])  # noqa: E731
        m_block.attn.qkv.weight.data = torch.cat([q, rep(k), rep(v)])
        m_block.attn.qkv.bias.data = torch.cat([qb, rep(kb), rep(vb)])
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x))


def test_logits_match_huggingface_gpt2() -> None:
    transformers = pytest.importorskip("transformers")
    model = tiny()
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=97, n_positions=16, n_embd=32, n_layer=2, n_head=4,
            resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, layer_norm_epsilon=1e-5,
        )
    ).eval()
    sd = {"transformer.wte.weight": model.wte.weight, "transformer.wpe.weight": model.wpe.weight,
          "transformer.ln_f.weight": model.norm.weight, "transformer.ln_f.bias": model.norm.bias,
          "lm_head.weight": model.lm_head.weight}
    for i, b in enumerate(model.blocks):
        p = f"transformer.h.{i}."
        sd |= {p + "ln_1.weight": b.norm_attn.weight, p + "ln_1.bias": b.norm_attn.bias,
               p + "ln_2.weight": b.norm_mlp.weight, p + "ln_2.bias": b.norm_mlp.bias,
               # GPT-2's Conv1D stores (in, out): the transpose of nn.Linear
               p + "attn.c_attn.weight": b.attn.qkv.weight.T, p + "attn.c_attn.bias": b.attn.qkv.bias,
               p + "attn.c_proj.weight": b.attn.proj.weight.T, p + "attn.c_proj.bias": b.attn.proj.bias,
               p + "mlp.c_fc.weight": b.mlp.fc.weight.T, p + "mlp.c_fc.bias": b.mlp.fc.bias,
               p + "mlp.c_proj.weight": b.mlp.proj.weight.T, p + "mlp.c_proj.bias": b.mlp.proj.bias}
    hf.load_state_dict({k: v.detach() for k, v in sd.items()}, strict=False)
    x = torch.randint(0, 97, (3, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-5, rtol=1e-4)


def test_logits_match_huggingface_llama_with_gqa() -> None:
    transformers = pytest.importorskip("transformers")
    model = tiny(norm="rmsnorm", mlp="swiglu", position="rope", bias=False, tie_embeddings=False, n_kv_head=2, norm_eps=1e-6)
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=97, hidden_size=32, intermediate_size=model.config.hidden_dim, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16, rms_norm_eps=1e-6,
            rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        )
    ).eval()
    sd = {"model.embed_tokens.weight": model.wte.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.lm_head.weight}
    for i, b in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = b.attn.qkv.weight.split([32, 16, 16])
        sd |= {p + "input_layernorm.weight": b.norm_attn.weight, p + "post_attention_layernorm.weight": b.norm_mlp.weight,
               p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
               p + "self_attn.o_proj.weight": b.attn.proj.weight, p + "mlp.gate_proj.weight": b.mlp.gate.weight,
               p + "mlp.up_proj.weight": b.mlp.up.weight, p + "mlp.down_proj.weight": b.mlp.proj.weight}
    missing, unexpected = hf.load_state_dict({k: v.detach() for k, v in sd.items()}, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    x = torch.randint(0, 97, (3, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-5, rtol=1e-4)


def test_too_long_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="block_size 16"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))
