"""`--technique data`: what the pretraining data pipeline is worth (GPT-3, Gopher and FineWeb practice).

The source's documents (by default the Python docs' prose pages) are split by document; the train
split becomes a raw, web-like corpus with the defects a pipeline targets planted at stated rates
(exact and near duplicates, mojibake, spam: `datamodules/web_cleaning.py::make_raw_corpus`), and the
pipeline (ftfy normalisation, exact dedup by hash, MinHash + LSH near-dedup, Gopher's quality
rules) filters it. The same decoder trains on raw, on deduplicated only and on filtered corpora side by
side, at equal tokens per step, and all are validated on the same held-out documents. The report counts every stage, scores
each stage against the planted ground truth, and checks the claim from the two validation losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from datamodules.ablation import AblationDataConfig, AblationDataModule
from datamodules.web_cleaning import STAGES
from datamodules.pretrain import CorpusConfig
from modules.nn import DecoderConfig
from modules.training.corpus_arms import AblationSettings, CorpusArm, CorpusArmsModule
from modules.training.pretrain import OptimConfig
from reports.claims import ClaimResult, check_above, check_below
from reports.plots import grouped_bars, loss_curves
from repro.golden import CORPUS, SHRINK
from repro.registry import Finished, Measured, Step, Technique, register
from repro.steps import ARM_EVAL, SPEED, arm_eval_scores, arms
from repro.techniques.architectures import CORPUS_STATS
from repro.trainer import EvalConfig, TrainConfig, check_manual_optimization

SOURCE = "GPT-3 (Brown et al. 2020, Sec. 2.2); Gopher (Rae et al. 2021, App. A); FineWeb (Penedo et al. 2024)"
NEAR_RECALL = 0.9  # of the planted near-copies at or above the Jaccard threshold, MinHash + LSH should find nearly all


@dataclass
class DataConfig:
    """Sections of a data preset. `model.vocab_size` follows `data.vocab_size`."""

    model: DecoderConfig = field(default_factory=DecoderConfig)
    data: CorpusConfig = field(default_factory=CorpusConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pipeline: AblationDataConfig = field(default_factory=AblationDataConfig)
    ablation: AblationSettings = field(default_factory=AblationSettings)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(grad_clip=0.0))
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        self.model.vocab_size = self.data.vocab_size
        check_manual_optimization(self.train, "each arm clips its own gradients; set ablation.grad_clip and train.grad_clip=0",
                                  "the arms step once per batch; raise data.batch_size instead")


def build(config: DataConfig, seed: int, stages: dict[str, Path]) -> tuple[CorpusArmsModule, AblationDataModule]:
    module = CorpusArmsModule(config.model, config.optim, config.ablation, config.train.max_steps)
    return module, AblationDataModule(config.data, config.pipeline, block_size=config.model.block_size, seed=seed)


def corpus_arms(config: DataConfig) -> list[CorpusArm]:
    return [CorpusArm(**arm) for arm in config.ablation.arms]


def _pipeline(finished: Finished) -> Measured:
    """Every stage's counts, each planted kind's fate, the near-copies' recall; the funnel (pipeline.png) and its tables."""
    datamodule, threshold = finished.datamodule, finished.config.pipeline.filter_config().threshold
    stages, plants, near = datamodule.stages, datamodule.plants, datamodule.near_copies
    metrics: dict[str, Any] = {}
    for stage in STAGES:
        metrics |= {f"pipeline/{stage}/{k}": v for k, v in stages[stage].items()}
    metrics |= {f"pipeline/quality_rule/{rule}": n for rule, n in stages["quality_rules"].items() if n}
    planted = {kind: entry for kind, entry in plants.items() if isinstance(entry, dict) and "docs" in entry}  # not "stages": each stage's precision
    for kind, entry in planted.items():
        metrics |= {f"plants/{kind}/docs": entry["docs"], f"plants/{kind}/removed_fraction": entry["removed_fraction"]}
        if "repaired" in entry:
            metrics[f"plants/{kind}/repaired"] = entry["repaired"]
    above = [e for e in near if e["jaccard"] >= threshold]
    metrics |= {"near_copies/planted": len(near), "near_copies/at_or_above_threshold": len(above),
                "near_copies/recall_above_threshold": sum(e["removed"] for e in above) / len(above) if above else None,
                "near_copies/recall_all": sum(e["removed"] for e in near) / len(near) if near else None}

    left = {"raw": stages[STAGES[0]]["docs_in"], **{stage: stages[stage]["docs_out"] for stage in STAGES}}
    chart = grouped_bars({"documents": left}, "documents left", "Documents after each stage of the pipeline")
    (finished.run_dir / "pipeline.png").write_bytes(chart)
    funnel = ["| stage | docs in | removed | docs out | characters out | seconds |", "|---|---:|---:|---:|---:|---:|"]
    for stage in STAGES:
        s = stages[stage]
        funnel.append(f"| {stage} | {s['docs_in']:,} | {s['docs_removed']:,} | {s['docs_out']:,} | {s['chars_out']:,} | {s['seconds']:.1f} |")
    rules = ["| quality rule (Gopher) | documents removed |", "|---|---:|"]
    rules += [f"| {rule} | {n:,} |" for rule, n in stages["quality_rules"].items() if n]
    truth = ["| planted kind | documents | removed | by stage | repaired |", "|---|---:|---:|---|---:|"]
    for kind, entry in planted.items():
        by = ", ".join(f"{k} {v}" for k, v in entry.get("removed_by", {}).items())
        truth.append(f"| {kind} | {entry['docs']:,} | {entry['removed']:,} ({entry['removed_fraction']:.0%}) | {by} | "
                     f"{entry.get('repaired', '')} |")
    return Measured(metrics, sections={"Pipeline": ["![documents after each stage](pipeline.png)", "", *funnel, "", *rules],
                                       "Against the planted defects": truth})


def _report(finished: Finished) -> Measured:
    """The loss curves per corpus (arm_losses.png), the arms table, and how the corpora were made."""
    config, metrics = finished.config, finished.metrics
    title = "Validation and train loss per corpus (equal tokens)"
    (finished.run_dir / "arm_losses.png").write_bytes(loss_curves(finished.module.loss_curves(), title))
    arms = corpus_arms(config)
    scores = arm_eval_scores(metrics, [arm.name for arm in arms])
    tasks = list(dict.fromkeys(t for s in scores.values() for t in s))
    table = ["| arm | corpus | train tokens in the corpus | val loss | train s |" + "".join(f" {t} |" for t in tasks),
             "|---|---|---:|---:|---:|" + "---:|" * len(tasks)]
    for arm in arms:
        loss = metrics[f"{arm.name}/val_loss"]
        table.append(f"| {arm.name} | {arm.corpus} | {metrics[f'data/{arm.corpus}_tokens']:,} | "
                     f"{'' if loss is None else f'{loss:.4f}'} | {metrics[f'{arm.name}/train_seconds']:.1f} |"
                     + "".join(f" {scores[arm.name].get(t, float('nan')):.4f} |" for t in tasks))
    p, filters = config.pipeline, config.pipeline.filter_config()
    notes = [
        f"Source: {config.data.source}{f', documents under {p.only}' if p.only else ''}; validation: the same held-out "
        f"documents for both arms ({metrics['data/val_docs']} documents, {metrics['data/val_tokens']:,} tokens), never "
        "planted or filtered. One tokenizer, trained on the clean train split (neither arm's corpus), packs all three.",
        f"Raw corpus: the clean train documents plus planted defects (`pipeline.plants`: {p.plants or 'the defaults'}, seed "
        f"{p.plant_seed}); each plant's id says what it is, which is the ground truth of the table above.",
        f"Both arms train {config.train.max_steps} steps of {config.data.batch_size} x {config.model.block_size} tokens from "
        "the same initial weights: equal tokens, each from its own corpus.",
        f"Near-copies: {metrics['near_copies/planted']} planted; {metrics['near_copies/at_or_above_threshold']} of them at or "
        f"above the Jaccard threshold {filters.threshold} on {filters.shingle_words}-word shingles (computed exactly), which is "
        "what MinHash + LSH estimates and is asked to find; the others are, by construction of their edits, below it.",
    ]
    return Measured(notes=notes, sections={"Arms": ["![loss per arm](arm_losses.png)", "", *table]})


def claims(config: DataConfig, metrics: Mapping[str, Any]) -> list[ClaimResult]:
    """Filtered and deduplicated arms against the raw one, then MinHash + LSH's recall of the planted near-copies."""
    by_corpus = {arm.corpus: arm.name for arm in corpus_arms(config)}
    threshold = config.pipeline.filter_config().threshold
    results = []
    if {"raw", "filtered"} <= set(by_corpus):
        results.append(check_below(
            claim="A model trained on the filtered corpus reaches a lower validation loss than on the raw one at equal tokens",
            source=SOURCE, metric=f"validation loss of {by_corpus['filtered']} (nats/token, held-out documents)",
            measured=metrics.get(f"{by_corpus['filtered']}/val_loss"), bound=metrics.get(f"{by_corpus['raw']}/val_loss"), factor=1.0,
            paper="deduplicated, filtered data trains better models per token (GPT-3 Sec. 2.2; Gopher Fig. A3; FineWeb Fig. 3)",
            bound_name=f"{by_corpus['raw']}'s loss"))
    if {"raw", "deduped"} <= set(by_corpus):
        results.append(check_below(
            claim="Deduplication alone lowers the validation loss at equal tokens", source="Lee et al. 2022 (Deduplicating "
            "Training Data Makes Language Models Better)", metric=f"validation loss of {by_corpus['deduped']} (nats/token)",
            measured=metrics.get(f"{by_corpus['deduped']}/val_loss"), bound=metrics.get(f"{by_corpus['raw']}/val_loss"), factor=1.0,
            paper="same or better perplexity with fewer training steps after exact and near dedup", bound_name=f"{by_corpus['raw']}'s loss"))
    results.append(check_above(
        claim="MinHash with LSH finds the near-duplicates above its similarity threshold", source="Broder 1997; GPT-3 App. A; FineWeb",
        metric=f"share of planted near-copies with exact Jaccard >= {threshold} that the pipeline removed",
        measured=metrics.get("near_copies/recall_above_threshold"), bound=NEAR_RECALL, factor=1.0,
        paper="fuzzy dedup at Jaccard ~0.8 (FineWeb: 5-grams, 112 hashes)", bound_name=f"{NEAR_RECALL:.0%}"))
    return results


register(
    Technique(
        name="data",
        summary="the pretraining data pipeline: normalise, exact + MinHash dedup, quality filters; raw vs filtered at equal tokens",
        config=DataConfig,
        module=CorpusArmsModule,
        build=build,
        steps=(CORPUS_STATS, arms(lambda module, arm: {"corpus": arm.corpus}), SPEED, Step("pipeline", _pipeline), ARM_EVAL,
               Step("report", _report)),
        claims=claims,
        golden_overrides=(*CORPUS, *SHRINK, "pipeline.only=null"),
        # a benchmark times the step, not the pipeline: any source's documents, 2 MB of them
        quick=("pipeline.only=null", "data.max_bytes=2000000"),
    )
)
