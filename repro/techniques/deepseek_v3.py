"""`--technique deepseek-v3`: DeepSeek-V3's architecture, counted at full size and trained at a tiny one.

The calculator (`modules/nn/calculator.py`) counts the published configuration's parameters, total
and activated, and its KV cache per token, and checks the report's 671B / 37B. Then a decoder of the
same shape at the tiny scale (MLA with a low-rank query, one shared and eight routed experts with
sigmoid affinities and auxiliary-loss-free balancing, the first block dense, untied embeddings)
trains with and without DeepSeek-V3's sequential MTP module (depth 1) side by side, as the MTP
technique does; its steps and claims (losses, MTP acceptance and speedup) follow, with MaxVio per arm.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from modules.nn.calculator import DEEPSEEK_V3, count, kv_cache_bytes_per_token
from reports.claims import ClaimResult
from repro.golden import CORPUS, SHRINK
from repro.registry import Finished, Measured, Step, Technique, register
from repro.techniques import mtp

SOURCE = "DeepSeek-V3 technical report (2024), Sec. 2 and Table 1 (config.json of deepseek-ai/DeepSeek-V3)"


def _counted(finished: Finished) -> Measured:
    """The published model's counts (`v3/*`), and the tiny model's counted by the calculator and by the module (`tiny/*`)."""
    full = count(DEEPSEEK_V3)
    embedding = DEEPSEEK_V3.padded_vocab_size * DEEPSEEK_V3.n_embd
    activated = full.active - embedding  # the input embedding is a lookup: what a token's compute touches
    mha = replace(DEEPSEEK_V3, attention="standard", head_size=128)  # the same heads, keys and values cached
    decoder = finished.module.decoder(finished.module.arms[0].name)
    tiny = count(decoder.config)
    metrics = {"v3/params_total": full.total, "v3/params_activated": activated, "v3/params_activated_with_embedding": full.active,
               "v3/kv_bytes_per_token_bf16": kv_cache_bytes_per_token(DEEPSEEK_V3),
               "v3/kv_bytes_per_token_mha_bf16": kv_cache_bytes_per_token(mha),
               "tiny/params_total": tiny.total, "tiny/params_activated": tiny.active,
               "tiny/params_counted_by_module": decoder.num_params()}
    lines = ["| | total parameters | activated | KV cache per token (bf16) |", "|---|---:|---:|---:|",
             f"| DeepSeek-V3 (published config) | {full.total / 1e9:,.2f}B | {activated / 1e9:,.2f}B (+{embedding / 1e9:.2f}B input "
             f"embedding) | {metrics['v3/kv_bytes_per_token_bf16']:,} B (MHA with the same heads: "
             f"{metrics['v3/kv_bytes_per_token_mha_bf16']:,} B) |",
             f"| this run's tiny model | {tiny.total:,} | {tiny.active:,} | {kv_cache_bytes_per_token(decoder.config):,} B |",
             "", "DeepSeek-V3 by part: "
             + ", ".join(f"{k.replace('_', ' ')} {getattr(full, k) / 1e9:.2f}B" for k in
                         ("embedding", "head", "attention", "dense_mlp", "moe_shared", "moe_routed"))]
    return Measured(metrics, sections={"DeepSeek-V3 counted": lines})


def _balance(finished: Finished) -> Measured:
    """The balance of each arm's loss-free experts over the validation set (`<arm>/maxvio_global`)."""
    return Measured({f"{arm.name}/maxvio_global": finished.metrics.get(f"val/{arm.name}/maxvio_global")
                     for arm in finished.module.arms})


def counted_claims(metrics: Mapping[str, Any]) -> list[ClaimResult]:
    """The published model's 671B / 37B, and the calculator against the module, from `_counted`'s metrics."""
    total, activated = metrics.get("v3/params_total"), metrics.get("v3/params_activated")
    with_embedding = metrics.get("v3/params_activated_with_embedding")
    tiny, built = metrics.get("tiny/params_total"), metrics.get("tiny/params_counted_by_module")
    published = dict(claim="DeepSeek-V3 has 671B parameters, 37B activated per token", source=SOURCE,
                     metric="parameters of the published config counted matrix by matrix (main model, without the MTP module)",
                     paper="671B total, 37B activated", threshold="rounds to 671B and 37B")
    calculator = dict(claim="The calculator counts what the decoder builds", source="this suite",
                      metric="parameters of the tiny model, calculator vs module", paper="-", threshold="equal")
    if None in (total, activated, with_embedding):
        first = ClaimResult(**published, measured=None, verdict="not measured", detail="the published config was not counted")
    else:
        first = ClaimResult(**published, measured=total,
                            verdict="reproduced" if round(total / 1e9) == 671 and round(activated / 1e9) == 37 else "not reproduced",
                            detail=f"total {total / 1e9:.2f}B; activated {activated / 1e9:.2f}B without the input embedding "
                            f"({with_embedding / 1e9:.2f}B with it)")
    if tiny is None or built is None:
        second = ClaimResult(**calculator, measured=None, verdict="not measured", detail="the tiny model was not counted")
    else:
        second = ClaimResult(**calculator, measured=tiny, verdict="reproduced" if tiny == built else "not reproduced",
                             detail=f"calculator {tiny:,}, module {built:,}")
    return [first, second]


def claims(config: mtp.MTPConfig, metrics: Mapping[str, Any]) -> list[ClaimResult]:
    return [*counted_claims(metrics), *mtp.claims(config, metrics)]


register(
    Technique(
        name="deepseek-v3",
        summary="DeepSeek-V3's shape: 671B/37B counted from its config; a tiny MLA + DeepSeekMoE + MTP model trained",
        config=mtp.MTPConfig,
        module=mtp.MTPModule,
        build=mtp.build,
        steps=(Step("DeepSeek-V3 counted", _counted), *mtp.STEPS, Step("balance", _balance)),
        claims=claims,
        golden_overrides=(*CORPUS, *SHRINK, "model.mla_kv_rank=32", "model.mla_q_rank=24",
                          "model.mla_rope_dim=8", "decode.prompts=2", "decode.prompt_tokens=8", "decode.new_tokens=8",
                          "decode.repeats=1"),
    )
)
