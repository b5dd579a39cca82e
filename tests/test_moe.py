"""The mixture-of-experts layer, its balancing, and the bias update across processes."""

from __future__ import annotations

import os
import tempfile

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from modules.training.moe import MoEArm, MoEModule, MoESettings, arm_config
from modules.nn import Decoder, DecoderConfig
from modules.nn.moe import MoE, max_violation, update_biases
from modules.training.pretrain import OptimConfig


def moe_config(**overrides) -> DecoderConfig:
    return DecoderConfig(**{"vocab_size": 64, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16, "mlp": "swiglu",
                            "moe_experts": 6, "moe_top_k": 2, "moe_shared": 1, **overrides})


def layer(**overrides) -> MoE:
    torch.manual_seed(0)
    moe = MoE(moe_config(**overrides)).double()
    moe.reset_parameters(0.3, 0.3)
    return moe


def swiglu(x: torch.Tensor, w_in: torch.Tensor, w_gate: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ w_gate) * (x @ w_in)) @ w_out


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_dispatch_matches_a_token_by_token_reference(score: str) -> None:
    moe = layer(moe_score=score, moe_balance="loss_free")
    moe.expert_bias.copy_(torch.linspace(-0.2, 0.3, 6, dtype=torch.float64))
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    out = moe(x)
    e, s = moe.experts, moe.shared
    for b in range(2):
        for t in range(5):
            token = x[b, t]
            logits = moe.router.weight @ token
            affinity = logits.softmax(-1) if score == "softmax" else logits.sigmoid()
            chosen = sorted(range(6), key=lambda i: -(affinity[i] + moe.expert_bias[i]).item())[:2]
            gates = affinity[chosen] / (affinity[chosen].sum() if score == "sigmoid" else 1.0)
            expected = swiglu(token, s.w_in[0], s.w_gate[0], s.w_out[0])
            for gate, i in zip(gates, chosen):
                expected = expected + gate * swiglu(token, e.w_in[i], e.w_gate[i], e.w_out[i])
            torch.testing.assert_close(out[b, t], expected)
    assert moe.last_load.sum() == 2 * 5 * 2


def test_the_bias_picks_experts_but_never_weighs_them() -> None:
    moe = layer(moe_score="sigmoid")
    x = torch.randn(40, 16, dtype=torch.float64)
    affinity, chosen, gates = moe.route(x)
    moe.expert_bias[4] = 10.0
    affinity2, chosen2, gates2 = moe.route(x)
    assert (chosen2 == 4).any(-1).all()  # expert 4 is now picked for every token
    torch.testing.assert_close(affinity2, affinity)
    # gates are the unbiased affinities of the chosen experts, normalised
    torch.testing.assert_close(gates2, affinity.gather(-1, chosen2) / affinity.gather(-1, chosen2).sum(-1, keepdim=True))


def test_balance_losses_follow_their_formula() -> None:
    for balance, alpha in (("aux", 0.01), ("loss_free_seq", 0.002)):
        moe = layer(moe_balance=balance, moe_aux_alpha=0.01, moe_seq_alpha=0.002)
        x = torch.randn(3, 7, 16, dtype=torch.float64)
        moe(x)
        with torch.no_grad():
            affinity, chosen, _ = moe.route(x.reshape(-1, 16))
        normalised = affinity / affinity.sum(-1, keepdim=True)
        groups = [range(21)] if balance == "aux" else [range(7 * b, 7 * b + 7) for b in range(3)]
        expected = 0.0
        for rows in groups:
            rows = list(rows)
            f = torch.tensor([sum(int(i in chosen[r]) for r in rows) for i in range(6)], dtype=torch.float64) * 6 / (2 * len(rows))
            expected += alpha * float((f * normalised[rows].mean(0)).sum()) / len(groups)
        assert moe.aux_loss.item() == pytest.approx(expected, rel=1e-9), balance
    assert layer(moe_balance="loss_free").aux_loss is None


def test_bias_moves_against_the_load_and_balances_a_skewed_router() -> None:
    moe = layer(moe_bias_rate=0.01)
    moe.update_bias(0.01, torch.tensor([5.0, 1.0, 3.0, 3.0, 3.0, 3.0], dtype=torch.float64))
    assert moe.expert_bias.tolist() == pytest.approx([-0.01, 0.01, 0, 0, 0, 0])
    moe.expert_bias.zero_()
    with torch.no_grad():
        moe.router.weight[0] += 0.5  # with inputs of mean 1, expert 0 wins every token
    x = torch.randn(1, 256, 16, dtype=torch.float64) + 1.0
    moe.train()
    moe(x)
    before = float(max_violation(moe.last_load))
    for _ in range(300):
        moe(x)
        update_biases([moe], 0.01)
    moe(x)
    assert before > 1.0 and float(max_violation(moe.last_load)) < 0.3 * before


def test_max_violation() -> None:
    assert max_violation(torch.tensor([3, 3, 3, 3])).item() == 0
    assert max_violation(torch.tensor([4, 0, 0, 0])).item() == 3
    torch.testing.assert_close(max_violation(torch.tensor([[2, 2], [3, 1]])), torch.tensor([0.0, 0.5]))


def test_decoder_places_moe_layers_and_counts_active_parameters() -> None:
    decoder = Decoder(moe_config(n_layer=4, moe_every=2))
    assert [isinstance(b.mlp, MoE) for b in decoder.blocks] == [False, True, False, True]
    config = moe_config(n_layer=4, bias=False)
    dense, moe = Decoder(arm_config(config, MoEArm("dense", "dense"))), Decoder(config)
    # the dense twin has the MoE's active width: a token uses as many parameters in both, but for the router
    assert moe.num_params(active=True) == dense.num_params() + 4 * 16 * 6
    assert moe.num_params() == moe.num_params(active=True) + 4 * 4 * 3 * 16 * config.moe_hidden_dim  # 4 idle experts a layer
    with pytest.raises(ValueError, match="moe_top_k"):
        moe_config(moe_top_k=7)


def _ddp_worker(rank: int, world: int, init: str, results: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    moe = layer(moe_bias_rate=0.01)
    moe.train()
    torch.manual_seed(100 + rank)  # each process routes its own tokens
    moe(torch.randn(1, 50, 16, dtype=torch.float64))
    own = moe.load.clone()

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    loads = update_biases([moe], 0.01, all_reduce)
    results[rank] = (own, loads[0].clone(), moe.expert_bias.clone())
    dist.destroy_process_group()


def test_bias_update_sees_the_global_load_under_ddp() -> None:
    """Two gloo processes route different tokens; after the update both hold the bias that the summed
    load gives, which neither's own load would."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(2, f"file://{os.path.join(folder, 'init')}", results), nprocs=2)
        (own0, global0, bias0), (own1, global1, bias1) = results[0], results[1]
    torch.testing.assert_close(global0, own0 + own1)
    torch.testing.assert_close(global1, global0)
    torch.testing.assert_close(bias0, bias1)
    torch.testing.assert_close(bias0, 0.01 * torch.sign((own0 + own1).mean() - (own0 + own1)))
    assert not torch.equal(torch.sign(own0.mean() - own0), torch.sign((own0 + own1).mean() - (own0 + own1)))


def test_moe_arms_start_equal_train_and_only_loss_free_arms_move_their_bias() -> None:
    config = moe_config(vocab_size=40)
    torch.manual_seed(0)
    module = MoEModule(config, OptimConfig(lr=1e-2, warmup_steps=1), MoESettings(), max_steps=20)
    a, b = module.decoder("no-balancing").state_dict(), module.decoder("loss-free").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    batch = torch.randint(0, 40, (8, 17))
    before = {arm.name: module.decoder(arm.name).loss(batch[:, :-1], batch[:, 1:]).item() for arm in module.arms}
    trainer = L.Trainer(max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(module, torch.utils.data.DataLoader([row for row in batch.repeat(20, 1)], batch_size=8))
    for arm in module.arms:
        assert module.decoder(arm.name).loss(batch[:, :-1], batch[:, 1:]).item() < before[arm.name] - 0.5
        biases = [m.expert_bias.abs().sum().item() for m in module.decoder(arm.name).moe_layers()]
        moved = arm.balance.startswith("loss_free")
        assert all((x > 0) == moved for x in biases), arm.name
        assert len(module.loads[arm.name]) == (0 if arm.balance == "dense" else 20)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="needs a Hopper GPU")
def test_grouped_gemm_experts_match_the_loop_on_hopper() -> None:
    torch.manual_seed(0)
    moe = MoE(moe_config(n_embd=128, moe_hidden=128, moe_experts=8)).cuda().to(torch.bfloat16)
    moe.reset_parameters(0.02, 0.02)
    x = torch.randn(2, 512, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert moe._grouped_gemm(x.view(-1, 128))
    out = {}
    for grouped in (True, False):
        moe.grouped_gemm = grouped
        y = moe(x)
        out[grouped] = (y, *torch.autograd.grad(y.float().pow(2).sum(), [x, moe.experts.w_in]))
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-3)


class SaveBiases(L.Callback):
    """Writes each process's expert biases and recorded loads at the end of training."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer: L.Trainer, module: MoEModule) -> None:
        biases = {a.name: [m.expert_bias.clone() for m in module.decoder(a.name).moe_layers()] for a in module.arms}
        torch.save({"biases": biases, "loads": module.loads}, os.path.join(self.folder, f"rank{trainer.global_rank}.pt"))


def test_moe_module_under_ddp_keeps_one_bias_across_processes() -> None:
    """Lightning's DDP on two CPU processes (gloo), each on its own half of the batches: after
    training, both processes hold the same biases, moved by the loads summed over both."""
    config = moe_config(vocab_size=40)
    settings = MoESettings(arms=[{"name": "loss-free", "balance": "loss_free"}])
    torch.manual_seed(0)
    module = MoEModule(config, OptimConfig(lr=1e-2, warmup_steps=1), settings, max_steps=6)
    data = torch.randint(0, 40, (48, 17))
    with tempfile.TemporaryDirectory() as folder:
        trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, accelerator="cpu", devices=2,
                            strategy="ddp_spawn", callbacks=[SaveBiases(folder)])
        trainer.fit(module, torch.utils.data.DataLoader([row for row in data], batch_size=4))
        ranks = [torch.load(os.path.join(folder, f"rank{r}.pt")) for r in (0, 1)]
    for a, b in zip(ranks[0]["biases"]["loss-free"], ranks[1]["biases"]["loss-free"]):
        torch.testing.assert_close(a, b)
        assert a.abs().sum() > 0
    assert ranks[0]["loads"] == ranks[1]["loads"]  # every step's loads are the global ones
    assert sum(ranks[0]["loads"]["loss-free"][0][0]) == 2 * 4 * 16 * config.moe_top_k  # both processes' slots, first step


def test_a_preset_without_experts_is_refused_before_the_run() -> None:
    from repro.techniques.moe import MoEConfig

    with pytest.raises(ValueError, match="model.moe_experts is 0"):
        MoEConfig(model=DecoderConfig(mlp="swiglu"))


def cpu_grouped_mm() -> bool:
    """Whether this torch runs `torch._grouped_mm` on CPU tensors (recent releases do; it began as CUDA only)."""
    a, b = torch.ones(4, 16, dtype=torch.bfloat16), torch.ones(2, 16, 16, dtype=torch.bfloat16)
    try:
        torch._grouped_mm(a, b, offs=torch.tensor([1, 4], dtype=torch.int32))
    except (AttributeError, NotImplementedError, RuntimeError):
        return False
    return True


@pytest.mark.parametrize("path", ["looped", pytest.param("grouped", marks=pytest.mark.skipif(
    not cpu_grouped_mm(), reason="torch._grouped_mm runs on CUDA only in this torch"))])
def test_experts_under_bf16_autocast_sum_in_the_tokens_dtype_and_match_float32(path: str, monkeypatch) -> None:
    """Under autocast the experts' matmuls run in bf16 while the tokens stay float32 (a GPU without the grouped
    GEMMs, or a CPU): the layer weighs and sums the bf16 rows in float32 (index_add_ refuses a bf16 source into a
    float32 output) and returns float32, within bf16's precision of the float32 layer, gradients included."""
    torch.manual_seed(0)
    moe = MoE(moe_config(n_embd=32, moe_hidden=32))
    moe.reset_parameters(0.3, 0.3)
    monkeypatch.setattr(moe, "_grouped_gemm", lambda rows: path == "grouped")
    x = torch.randn(2, 16, 32, requires_grad=True)
    out = {}
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = moe(x)
            chosen = moe.route(x.detach().reshape(-1, 32))[1]
        out[autocast] = (y, *torch.autograd.grad(y.pow(2).sum(), [x, moe.experts.w_in, moe.router.weight]), chosen)
    assert torch.equal(out[True][-1], out[False][-1])  # the same experts chosen: bf16 moved no token across a tie
    assert out[True][0].dtype == torch.float32
    for name, got, expected in zip(("output", "input grad", "expert grad", "router grad"), out[True], out[False]):
        scale = expected.abs().max().item()
        torch.testing.assert_close(got, expected, rtol=0, atol=3e-2 * scale, msg=f"{path}: {name}")
