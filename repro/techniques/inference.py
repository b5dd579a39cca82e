"""`--technique inference`: quantization and speculative decoding of a pretrained target, measured.

The run starts from the `pretrain` stage of the same preset (trained once and reused; `--init` names
another pretrain run). It trains a small draft decoder and an EAGLE head for the frozen target on the
target's corpus (`modules/training/inference.py`), then measures (`measurement/inference.py`), at batch 1:

- weight-only int8, int4 and GPTQ int4 of the target (`modules/nn/quant.py`): weight bytes, held-out
  loss, lm-eval's corpus perplexity and decode tokens/s, next to the unquantized target;
- speculative decoding with the draft model and with the EAGLE head at each draft length: greedy
  outputs checked equal to the target's own, acceptance, tokens per target pass and speedup, each next
  to Leviathan et al.'s formulas at the measured acceptance and cost ratio.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import yaml

from datamodules.pretrain import CorpusConfig, PretrainDataModule
from measurement.inference import PROMPTS_FILE, DecodeSettings, QuantSettings, measure, plot
from modules.nn.quant import SCHEMES, TORCHAO_SCHEMES
from modules.training.inference import DrafterSettings, InferenceModule
from modules.training.pretrain import OptimConfig
from reports.claims import ClaimResult, check_above, check_below, not_measured
from repro.checkpoints import load_model
from repro.evaluate import evaluate_model
from repro.golden import CORPUS, SHRINK
from repro.registry import Finished, Measured, Step, Technique, register
from repro.trainer import EvalConfig, TrainConfig, check_manual_optimization

LEVIATHAN = "Leviathan et al. 2023, Fast Inference from Transformers via Speculative Decoding"
EAGLE = "EAGLE (Li et al. 2024); EAGLE-3 (Li et al. 2025)"
GPTQ = "GPTQ (Frantar et al. 2023)"
INT8_SLACK = 1.01  # int8 weight-only: "no loss" read as within 1% of the unquantized held-out loss


@dataclass
class InferenceData:
    """The `data.` section: batches for the drafters' training; the corpus is the target's own."""

    batch_size: int = 16


@dataclass
class InferenceConfig:
    """Sections of an inference preset. The target is the pretrain stage's decoder; it has no `model.` section."""

    data: InferenceData = field(default_factory=InferenceData)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=20))
    drafters: DrafterSettings = field(default_factory=DrafterSettings)
    quant: QuantSettings = field(default_factory=QuantSettings)
    decode: DecodeSettings = field(default_factory=DecodeSettings)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(grad_clip=0.0))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(tasks=["repro_corpus_ppl"]))

    def __post_init__(self) -> None:
        check_manual_optimization(self.train, "each drafter clips its own gradients; set drafters.grad_clip and "
                                  "train.grad_clip=0", "the drafters step once per batch; raise data.batch_size instead")
        if not self.decode.gammas or min(self.decode.gammas) < 1:
            raise ValueError(f"decode.gammas={self.decode.gammas}: draft lengths of at least 1")
        if self.decode.prompts < 1 or self.decode.prompt_tokens < 1 or self.decode.new_tokens < 1:
            raise ValueError("decode.prompts, decode.prompt_tokens and decode.new_tokens must be positive")

        unknown = [s for s in self.quant.schemes if s not in (*SCHEMES, *TORCHAO_SCHEMES)]
        if unknown:
            raise ValueError(f"quant.schemes: unknown {unknown}; use {', '.join(SCHEMES + TORCHAO_SCHEMES)}")


def build(config: InferenceConfig, seed: int, stages: dict[str, Path]) -> tuple[InferenceModule, PretrainDataModule]:
    base_dir = Path(stages["pretrain"]).parent.parent
    base, _ = load_model(base_dir)
    needed = config.decode.prompt_tokens + config.decode.new_tokens + max(config.decode.gammas) + 2
    if needed > base.config.block_size:
        raise ValueError(f"decode.prompt_tokens + decode.new_tokens + the longest draft ({needed}) exceed the target's "
                         f"block_size {base.config.block_size}")
    module = InferenceModule(base.config, config.optim, config.drafters, config.train.max_steps, base_dir=base_dir)
    module.init_from(base)
    corpus = yaml.safe_load((base_dir / "config.yaml").read_text())["data"]
    data = CorpusConfig(**{**corpus, "batch_size": config.data.batch_size})
    return module, PretrainDataModule(data, block_size=base.config.block_size, seed=seed)


def _inputs(config: InferenceConfig, datamodule: PretrainDataModule) -> dict[str, Any]:
    """Prompts (the first tokens of evenly spaced validation blocks), GPTQ's calibration blocks and the held-out blocks."""
    val, train = datamodule.val_set, datamodule.train_set
    step = max(1, len(val) // config.decode.prompts)
    prompts = [val[i][: config.decode.prompt_tokens].tolist() for i in range(0, len(val), step)][: config.decode.prompts]
    calibration = torch.stack([torch.as_tensor(train[i][:-1]) for i in range(min(config.quant.calibration, len(train)))])  # block_size tokens
    held_out = torch.stack([torch.as_tensor(val[i]) for i in range(min(config.quant.held_out, len(val)))])
    return {"prompts": prompts, "calibration": calibration, "held_out": held_out}


def _measure(finished: Finished) -> Measured:
    """Quantization and speculative decoding of the target (`measurement.inference.measure`), their inputs in
    decode_prompts.json and their records in inference.json."""
    config, module, run_dir = finished.config, finished.module, finished.run_dir
    inputs = _inputs(config, finished.datamodule)
    (run_dir / PROMPTS_FILE).write_text(json.dumps({
        "prompts": inputs["prompts"], "calibration": inputs["calibration"].tolist(), "held_out": inputs["held_out"].tolist(),
        "quant": asdict(config.quant), "decode": asdict(config.decode)}))
    score = _scorer(config, module) if config.eval.enabled else None
    result = measure(module, inputs["prompts"], inputs["calibration"], inputs["held_out"], config.quant, config.decode, score)
    (run_dir / "inference.json").write_text(json.dumps(result, indent=2))
    metrics = {}
    for r in result["quantization"]:
        metrics.update({f"quant/{r['scheme']}/{k}": v for k, v in r.items() if isinstance(v, (int, float))})
        metrics.update({f"quant/{r['scheme']}/eval/{k}": v for k, v in r.get("scores", {}).items()})
    spec = result["speculation"]
    metrics.update({f"decode/{k}": v for k, v in spec.items() if k != "records"})
    for r in spec["records"]:
        metrics.update({f"{_spec_key(r['method'], r['temperature'], r['gamma'])}/{k}": v for k, v in r.items()
                        if isinstance(v, (int, float)) and k not in ("gamma", "temperature")})
    return Measured(metrics)


def _scorer(config: InferenceConfig, module: InferenceModule) -> Callable[[Any, str], dict[str, float]]:
    """lm-eval's scores of one (quantized) target on the run's tasks, with the target's tokenizer."""
    _, tokenizer = load_model(module.base_dir)

    def score(model: Any, scheme: str) -> dict[str, float]:
        return evaluate_model(model, tokenizer, module.base_dir, scheme, config.eval.tasks, config.eval.limit,
                              config.eval.batch_size, str(module.device))

    return score


def _spec_key(method: str, temperature: float, gamma: int) -> str:
    """The metrics' prefix of one drafter at one temperature and draft length: `spec/draft/t0/g2`."""
    return f"spec/{'draft' if method == 'draft model' else 'eagle'}/t{temperature:g}/g{gamma}"


def _report(finished: Finished) -> Measured:
    """Speedup against gamma (speculative.png), the quantization and speculation tables, from inference.json."""
    result = json.loads((finished.run_dir / "inference.json").read_text())
    (finished.run_dir / "speculative.png").write_bytes(plot(result))
    return Measured(notes=_notes(finished.config, result),
                    sections={"Quantization": _quant_table(result),
                              "Speculative decoding": ["![speedup against gamma](speculative.png)", "", *_spec_table(result)]})


def _quant_table(result: dict[str, Any]) -> list[str]:
    rows = result["quantization"]
    tasks = list(dict.fromkeys(k for r in rows for k in r.get("scores", {})))
    base = rows[0]
    lines = ["| scheme | weight MB | vs unquantized | held-out loss | decode tokens/s |" + "".join(f" {t} |" for t in tasks),
             "|---|---:|---:|---:|---:|" + "---:|" * len(tasks)]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['weight_bytes'] / 1e6:.2f} | {r['weight_bytes'] / base['weight_bytes']:.2f}x | "
                     f"{r['held_out_loss']:.4f} | {r['decode_tokens_per_s']:,.0f} |"
                     + "".join(f" {r.get('scores', {}).get(t, float('nan')):.4g} |" for t in tasks))
    return lines


def _spec_table(result: dict[str, Any]) -> list[str]:
    spec = result["speculation"]
    lines = [f"Plain decoding: target {spec['target_tokens_per_s']:,.0f} tokens/s, draft model {spec['draft_tokens_per_s']:,.0f} "
             f"tokens/s; cost ratio c (a draft step over a target step): draft model {spec['c_draft']:.3f}, EAGLE head "
             f"{spec['c_eagle']:.3f}. Each speedup divides by plain decoding at its own temperature"
             + "".join(f"; T = {t}: {r:,.0f} tokens/s" for t, r in spec.get("target_tokens_per_s_by_temperature", {}).items())
             + ".", "",
             "| drafter | temperature | gamma | alpha | tokens/pass | Eq. 1 at alpha | speedup | Thm. 3.8 at alpha, c | greedy mismatches |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in spec["records"]:
        eq1 = "" if r["formula_tokens_per_round"] is None else f"{r['formula_tokens_per_round']:.2f}"
        thm = "" if r["formula_speedup"] is None else f"{r['formula_speedup']:.2f}x"
        lines.append(f"| {r['method']} | {r['temperature']:g} | {r['gamma']} | {r['alpha']:.3f} | {r['tokens_per_round']:.2f} | "
                     f"{eq1} | {r['speedup']:.2f}x | {thm} | {r.get('greedy_mismatches', '')} |")
    return lines


def _notes(config: InferenceConfig, result: dict[str, Any]) -> list[str]:
    d = config.decode
    return [f"Batch 1, on {result['device']}: {d.prompts} held-out prompts of {d.prompt_tokens} tokens, {d.new_tokens} new tokens "
            f"each, best of {d.repeats} passes. alpha is drafts kept over drafts checked, pooled over depths (the estimate "
            "under Leviathan et al.'s i.i.d. model); tokens/pass counts every token over the target's passes after the "
            "prefill. The quantized layers dequantize to the model's dtype before each matmul (modules/nn/quant.py): they "
            "save weight memory, not time; torchao's kernels (quant.schemes torchao-int8 / torchao-int4, on a GPU) are "
            "the fast path."]


def claims(config: InferenceConfig, metrics: Mapping[str, Any]) -> list[ClaimResult]:
    """int8 and GPTQ against the unquantized target and RTN int4; greedy exactness and the speedup of each drafter."""
    return [*_quant_claims(config, metrics), *_spec_claims(config, metrics)]


def _quant_claims(config: InferenceConfig, metrics: Mapping[str, Any]) -> list[ClaimResult]:
    results = []
    schemes = ["none", *config.quant.schemes]
    loss = {scheme: metrics.get(f"quant/{scheme}/held_out_loss") for scheme in schemes}
    if "int8" in schemes:
        results.append(check_below(
            claim="Weight-only int8 (absmax per channel) keeps the model's quality", source="LLM.int8() (Dettmers et al. 2022); GPTQ",
            metric="held-out loss of int8 (nats/token)", measured=loss["int8"], bound=loss["none"],
            factor=INT8_SLACK, paper="no perplexity loss at 8 bits (GPTQ Table 3: RTN 8-bit within 0.1 ppl)",
            bound_name="the unquantized loss"))
    if "int4" in schemes and "gptq-int4" in schemes:
        results.append(check_below(
            claim="GPTQ int4 loses less than rounding to nearest at the same format", source=GPTQ,
            metric="held-out loss of gptq-int4", measured=loss["gptq-int4"], bound=loss["int4"],
            factor=1.0, paper="4-bit OPT-175B: GPTQ 8.37 vs RTN 10.54 ppl (Table 3)", bound_name="int4 (RTN)'s loss"))
    else:
        results.append(not_measured("GPTQ int4 loses less than rounding to nearest", GPTQ, "held-out loss", "Table 3",
                                    "needs quant.schemes int4 and gptq-int4"))
    return results


def _spec_claims(config: InferenceConfig, metrics: Mapping[str, Any]) -> list[ClaimResult]:
    """Over the greedy settings (temperature 0), each drafter at each draft length."""
    if 0.0 not in config.decode.temperatures:
        return []
    greedy = [(method, gamma, {k: metrics.get(f"{_spec_key(method, 0.0, gamma)}/{k}") for k in ("greedy_mismatches", "speedup", "alpha")})
              for method in ("draft model", "EAGLE") for gamma in config.decode.gammas]
    mismatches = [r["greedy_mismatches"] for _, _, r in greedy]
    results = [check_below(
        claim="Speculative decoding leaves greedy outputs unchanged", source=LEVIATHAN,
        metric=f"outputs differing from the target's own, over {len(greedy)} drafter x gamma settings",
        measured=None if None in mismatches else sum(mismatches), bound=1, factor=1.0, paper="identical outputs (Sec. 2.3)",
        bound_name="one mismatch")]
    for method, source, paper in (("draft model", LEVIATHAN, "2-3.4x on T5-XXL (Table 2)"),
                                  ("EAGLE", EAGLE, "2.7-3.5x (EAGLE); up to 6.5x (EAGLE-3) on 7-70B models")):
        timed = [(gamma, r) for m, gamma, r in greedy if m == method and r["speedup"] is not None]
        gamma, best = max(timed, key=lambda item: item[1]["speedup"], default=(None, None))
        alpha = "nan" if best is None or best["alpha"] is None else f"{best['alpha']:.2f}"  # NaN is None in metrics.json
        results.append(check_above(
            claim=f"Speculative decoding with {'a draft model' if method == 'draft model' else 'an EAGLE head'} is faster than "
            "plain decoding at batch 1", source=source,
            metric=f"greedy speedup at the best gamma ({gamma}; alpha {alpha})" if best else "greedy speedup at the best gamma",
            measured=best["speedup"] if best else None, bound=1.0, factor=1.0, paper=paper, bound_name="plain decoding"))
    return results


register(
    Technique(
        name="inference",
        summary="quantization (int8, int4, GPTQ) and speculative decoding (draft model, EAGLE) of a pretrained target",
        config=InferenceConfig,
        module=InferenceModule,
        build=build,
        steps=(Step("measure", _measure), Step("report", _report)),
        claims=claims,
        aliases=("speculative", "quantization"),
        requires=("pretrain",),
        step_metrics=("train/loss", "train/draft_loss", "train/eagle_loss"),
        val_metrics=("val/loss", "val/eagle_loss"),
        golden_metrics=("train/draft_loss", "train/eagle_loss", "val/loss", "val/eagle_loss"),
        eval_tasks=("repro_corpus_ppl",),
        golden_overrides=(
            *(f"pretrain.{o}" for o in (*CORPUS, *SHRINK)),
            "data.batch_size=8", "train.max_steps=8", "train.val_every=4", "train.val_batches=2", "train.checkpoint_every=8",
            "train.speed_window=4", "eval.enabled=false", "quant.group_size=32", "quant.calibration=4", "quant.held_out=4",
            "decode.prompts=2", "decode.prompt_tokens=4", "decode.new_tokens=6", "decode.gammas=[1,2]", "decode.repeats=1",
        ),
    )
)
