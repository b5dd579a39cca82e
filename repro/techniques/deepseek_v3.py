"""`--technique deepseek-v3`: DeepSeek-V3's architecture, counted at full size and trained at a tiny one.

The calculator (`modules/nn/calculator.py`) counts the published configuration's parameters, total
and activated, and its KV cache per token, and checks the report's 671B / 37B. Then a decoder of the
same shape at the tiny scale (MLA with a low-rank query, one shared and eight routed experts with
sigmoid affinities and auxiliary-loss-free balancing, the first block dense, untied embeddings)
trains with and without DeepSeek-V3's sequential MTP module (depth 1) side by side, as the MTP
technique does; its findings (losses, MTP acceptance and speedup) follow, with MaxVio per arm.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from modules.nn.calculator import DEEPSEEK_V3, count, kv_cache_bytes_per_token
from reports.claims import ClaimResult
from repro.golden import CORPUS, SHRINK
from repro.registry import Findings, Technique, register
from repro.techniques import mtp

SOURCE = "DeepSeek-V3 technical report (2024), Sec. 2 and Table 1 (config.json of deepseek-ai/DeepSeek-V3)"


def calculator_findings(module: Any) -> tuple[dict[str, Any], list[ClaimResult], list[str]]:
    """The published model's counts and claims, and the tiny model's counts against the module's."""
    full = count(DEEPSEEK_V3)
    embedding = DEEPSEEK_V3.padded_vocab_size * DEEPSEEK_V3.n_embd
    activated = full.active - embedding  # the input embedding is a lookup: what a token's compute touches
    mha = replace(DEEPSEEK_V3, attention="standard", head_size=128)  # the same heads, keys and values cached
    tiny = count(module.decoder(module.arms[0].name).config)
    metrics = {"v3/params_total": full.total, "v3/params_activated": activated, "v3/params_activated_with_embedding": full.active,
               "v3/kv_bytes_per_token_bf16": kv_cache_bytes_per_token(DEEPSEEK_V3),
               "v3/kv_bytes_per_token_mha_bf16": kv_cache_bytes_per_token(mha),
               "tiny/params_total": tiny.total, "tiny/params_activated": tiny.active,
               "tiny/params_counted_by_module": module.decoder(module.arms[0].name).num_params()}
    claims = [
        ClaimResult(claim="DeepSeek-V3 has 671B parameters, 37B activated per token", source=SOURCE,
                    metric="parameters of the published config counted matrix by matrix (main model, without the MTP module)",
                    measured=full.total, paper="671B total, 37B activated", threshold="rounds to 671B and 37B",
                    verdict="reproduced" if round(full.total / 1e9) == 671 and round(activated / 1e9) == 37 else "not reproduced",
                    detail=f"total {full.total / 1e9:.2f}B; activated {activated / 1e9:.2f}B without the input embedding "
                    f"({full.active / 1e9:.2f}B with it)"),
        ClaimResult(claim="The calculator counts what the decoder builds", source="this suite",
                    metric="parameters of the tiny model, calculator vs module", measured=tiny.total,
                    paper="-", threshold="equal", verdict="reproduced" if tiny.total == metrics["tiny/params_counted_by_module"]
                    else "not reproduced", detail=f"calculator {tiny.total:,}, module {metrics['tiny/params_counted_by_module']:,}"),
    ]
    lines = ["| | total parameters | activated | KV cache per token (bf16) |", "|---|---:|---:|---:|",
             f"| DeepSeek-V3 (published config) | {full.total / 1e9:,.2f}B | {activated / 1e9:,.2f}B (+{embedding / 1e9:.2f}B input "
             f"embedding) | {metrics['v3/kv_bytes_per_token_bf16']:,} B (MHA with the same heads: "
             f"{metrics['v3/kv_bytes_per_token_mha_bf16']:,} B) |",
             f"| this run's tiny model | {tiny.total:,} | {tiny.active:,} | "
             f"{kv_cache_bytes_per_token(module.decoder(module.arms[0].name).config):,} B |",
             "", "DeepSeek-V3 by part: "
             + ", ".join(f"{k.replace('_', ' ')} {getattr(full, k) / 1e9:.2f}B" for k in
                         ("embedding", "head", "attention", "dense_mlp", "moe_shared", "moe_routed"))]
    return metrics, claims, lines


def findings(config: mtp.MTPConfig, final: dict[str, float], module: Any, datamodule: Any, speed: list[dict[str, float]]) -> Findings:
    trained = mtp.findings(config, final, module, datamodule, speed)
    metrics, claims, lines = calculator_findings(module)
    for arm in module.arms:  # balance of the loss-free experts, per arm
        metrics[f"{arm.name}/maxvio_global"] = final.get(f"val/{arm.name}/maxvio_global")
    return Findings(metrics={**metrics, **trained.metrics}, claims=[*claims, *trained.claims], notes=trained.notes,
                    sections={"DeepSeek-V3 counted": lines, **trained.sections})


register(
    Technique(
        name="deepseek-v3",
        summary="DeepSeek-V3's shape: 671B/37B counted from its config; a tiny MLA + DeepSeekMoE + MTP model trained",
        config=mtp.MTPConfig,
        module=mtp.MTPModule,
        build=mtp.build,
        findings=findings,
        golden_overrides=(*CORPUS, *SHRINK, "model.mla_kv_rank=32", "model.mla_q_rank=24",
                          "model.mla_rope_dim=8", "decode.prompts=2", "decode.prompt_tokens=8", "decode.new_tokens=8",
                          "decode.repeats=1"),
    )
)
