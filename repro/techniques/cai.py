"""`--technique cai`: Constitutional AI (Bai et al. 2022): SL-CAI by critique-revise, RL-CAI by AI feedback and DPO.

The chat model is the `sft` stage of the same preset (trained once and reused; `cai.sft_overrides` are its
`--set` items). Its greedy responses to red-team and ordinary training prompts (`datamodules/red_team.py`) are
critiqued and revised by the critic under principles drawn from the constitution (`datamodules/constitution.yaml`);
the final revisions (`sl_cai.jsonl`) fine-tune a copy of the chat model (SL-CAI). SL-CAI then samples two
responses per training prompt, the judge labels each pair by the log-probs of the answers "A" and "B" to the
principle's multiple-choice question (`datamodules/cai.py`), and DPO trains RL-CAI from SL-CAI on the labelled pairs,
SL-CAI being the reference. The critic and the judge are the chat model itself (null), another suite checkpoint (a
run folder, e.g. a larger sft or pretrain run) or a Hugging Face causal LM (a hub name or a local folder). The
report: the checkers' violation rates of the chat model (base), SL-CAI and RL-CAI, greedy, on the same held-out
prompts, red-team and ordinary apart, and their helpfulness there (exact answers to the ordinary prompts, the
responses' length). The checkers only measure: no model reads their verdicts.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from datamodules.cai import (build_preference_pairs, build_sl_data, checker_agreement, critique_revise_batch, decoder_generator,
                             decoder_logprob, hf_generator, hf_logprob, to_pairs)
from datamodules.chat import END, is_chat_tokenizer
from datamodules.constitution import ANY, checkable, load_constitution, violation_rate
from datamodules.preference import PreferenceDataConfig, PreferenceDataModule
from datamodules.red_team import ORDINARY, helpfulness, split
from datamodules.sft import SFTDataConfig, SFTDataModule
from modules.training.dpo import DPOModule, DPOSettings
from modules.training.sft import LoraSettings, SFTModule, SFTOptimConfig
from reports.claims import check_above, check_below, not_measured
from repro import registry
from repro.checkpoints import load_model
from repro.registry import Findings, Fit, Technique, register
from repro.runner import RunSpec, _load_spec, stage_checkpoint, train_fit
from repro.techniques.dpo import with_reference
from repro.trainer import TrainConfig, on_gpu

SOURCE = "Constitutional AI (Bai et al. 2022), Fig. 2-3"
SAMPLES_SHOWN = 3  # critique-revision chains shown in the report


@dataclass
class SLSettings:
    """The `cai.sl.` section: supervised fine-tuning of the chat model on the revisions."""

    steps: int = 200
    batch_size: int = 16
    lr: float = 3e-4


@dataclass
class RLSettings:
    """The `cai.rl.` section: DPO of SL-CAI on the AI-labelled pairs, SL-CAI the reference."""

    steps: int = 200
    batch_size: int = 16
    beta: float = 0.1
    lr: float = 1e-4
    temperature: float = 1.0  # sampling temperature of the two responses per prompt
    min_margin: float = 0.0  # pairs the judge prefers by less than this |p_a - p_b| are left out


@dataclass
class CAISettings:
    constitution: str | None = None  # a YAML/JSON file of principles; None: the packaged constitution.yaml
    n_train: int = 256  # training prompts (critique-revise, then AI-feedback pairs)
    n_held_out: int = 64  # held-out prompts every model is scored on
    rounds: int = 1  # critique-revision rounds per response
    max_new_tokens: int = 24  # per response, critique and revision
    critic_temperature: float = 1.0  # sampling temperature of critiques and revisions (0: greedy)
    critic: str | None = None  # None: the chat model itself; a suite run folder (or .ckpt); or a HF causal LM (name or path)
    judge: str | None = None  # None: the chat model itself; a suite run folder (or .ckpt); or a HF causal LM (name or path)
    sl: SLSettings = field(default_factory=SLSettings)
    rl: RLSettings = field(default_factory=RLSettings)

    def __post_init__(self) -> None:
        if isinstance(self.sl, dict):
            self.sl = SLSettings(**self.sl)
        if isinstance(self.rl, dict):
            self.rl = RLSettings(**self.rl)
        checks = {
            "cai.n_train must be at least 4 and cai.n_held_out at least 1": self.n_train >= 4 and self.n_held_out >= 1,
            "cai.rounds and cai.max_new_tokens must be at least 1": self.rounds >= 1 and self.max_new_tokens >= 1,
            "cai.critic_temperature must be at least 0": self.critic_temperature >= 0,
            "cai.sl.steps, cai.rl.steps and their batch sizes must be positive":
                min(self.sl.steps, self.rl.steps, self.sl.batch_size, self.rl.batch_size) > 0,
            "cai.sl.lr, cai.rl.lr, cai.rl.beta and cai.rl.temperature must be positive":
                min(self.sl.lr, self.rl.lr, self.rl.beta, self.rl.temperature) > 0,
            "cai.critic and cai.judge are null (the chat model) or a model's name or path, not empty":
                all(m is None or m.strip() for m in (self.critic, self.judge)),
        }
        bad = [message for message, ok in checks.items() if not ok]
        if bad:
            raise ValueError("; ".join(bad))
        load_constitution(self.constitution)  # a ConstitutionError names the file and the principle


@dataclass
class CAIConfig:
    cai: CAISettings = field(default_factory=CAISettings)
    sft_overrides: list[str] = field(default_factory=list)  # `--set` items of the sft stage (`pretrain.`-prefixed reach its base)


def chat_model_stage(config: CAIConfig, seed: int, run_dir: Path) -> Path:
    """The run folder of the `sft` stage: the runner's own stage cache, at this run's preset where sft has it."""
    parent = _load_spec(run_dir)
    sft = registry.get("sft")
    preset = parent.preset if parent.preset in sft.presets else sft.default_preset
    spec = RunSpec("sft", preset, list(config.sft_overrides), seed, parent.trainer)
    return stage_checkpoint(spec, run_dir.parent.parent).parent.parent


def _train(run_dir: Path, name: str, module: Any, datamodule: Any, steps: int) -> Any:
    """Train SL-CAI or RL-CAI as the runner trains any model (`repro.runner.train_fit`: the run's seed, precision and
    accelerator, checkpoints under fits/<name>/, a resumed run reusing what it finished), in one process, with one
    validation batch at the end."""
    spec = _load_spec(run_dir)
    spec = replace(spec, trainer=replace(spec.trainer, devices=1))  # `distributed=False`: auto takes one device too
    train = TrainConfig(max_steps=steps, grad_clip=0.0, val_every=steps, val_batches=1, checkpoint_every=steps,
                        speed_window=max(1, min(10, steps)))
    return train_fit(Fit(name, lambda: module, lambda: datamodule, train, val_metrics=("val/loss",)), run_dir, spec).module


def sl_cai(chat_model: Any, tokenizer: Any, source: Path, settings: SLSettings, seed: int, run_dir: Path) -> tuple[Any, dict]:
    """(SL-CAI decoder, its data stats): the chat model's full weights fine-tuned on the chat records in `source`
    (responses only), with SFT's module and data (the LoRA arm off; the chat tokens are already in the vocabulary)."""
    block = chat_model.config.block_size
    rows = sum(1 for _ in source.open())
    if rows < 2:  # nothing to learn from: SL-CAI is the chat model, and the report says so
        return chat_model, {"rows": rows, "trained": 0}
    data = SFTDataConfig(source=str(source), max_len=block + 1, batch_size=max(1, min(settings.batch_size, rows - 1)),
                         val_fraction=0.1)
    datamodule = SFTDataModule(data, tokenizer, seed)
    datamodule.setup()
    data.batch_size = max(1, min(data.batch_size, len(datamodule.train_set)))
    if not datamodule.train_set:
        return chat_model, datamodule.stats | {"trained": 0}
    optim = SFTOptimConfig(lr=settings.lr, warmup_steps=min(10, settings.steps // 5))
    module = SFTModule(chat_model.config, optim, settings.steps, LoraSettings(enabled=False))
    module.model.load_state_dict(chat_model.state_dict())
    module = _train(run_dir, "sl-cai", module, datamodule, settings.steps)
    return module.model.eval(), datamodule.stats | {"batch_size": data.batch_size, "trained": 1}


def _fit(pair: Any, max_len: int) -> Any:
    """The pair with its prompt cut from the left so that prompt + the longer response is at most `max_len` tokens
    (as the generator cut the prompt it answered); None when a response alone does not fit."""
    room = max_len - max(len(pair.chosen), len(pair.rejected))
    if room < 1:
        return None
    pair.prompt = pair.prompt[-room:]
    return pair


def rl_cai(policy: Any, tokenizer: Any, records: list[dict], settings: RLSettings, seed: int, run_dir: Path) -> tuple[Any, dict]:
    """(RL-CAI decoder, its data stats): DPO (one arm) from `policy` on the AI-labelled `records`, `policy` the reference
    (its log-probs cached on the pairs by the dpo technique's `with_reference`)."""
    max_len = policy.config.block_size + 1  # the policy reads all but the last token
    pairs = [p for p in (_fit(p, max_len) for p in to_pairs(records, tokenizer)) if p is not None]
    random.Random(seed).shuffle(pairs)
    n_val = max(1, len(pairs) // 10)
    if len(pairs) - n_val < 1:  # nothing to learn from: RL-CAI is SL-CAI, and the report says so
        return policy, {"pairs_train": 0, "trained": 0}
    batch = min(settings.batch_size, len(pairs) - n_val)
    data = PreferenceDataConfig(source="cai", batch_size=batch, max_len=max_len)
    datamodule = PreferenceDataModule(data, pairs[n_val:], pairs[:n_val], pad_id=tokenizer.token_to_id(END), seed=seed)
    with_reference(datamodule, policy)
    dpo = DPOSettings(arms=[{"name": "rl-cai", "loss": "dpo", "beta": settings.beta}], lr=settings.lr,
                      warmup_steps=min(10, settings.steps // 5))
    module = DPOModule(policy.config, dpo, settings.steps)
    module.init_from(policy)
    module = _train(run_dir, "rl-cai", module, datamodule, settings.steps)
    return module.arm_model().eval(), datamodule.stats | {"batch_size": batch, "trained": 1}


def rates(generate_many: Any, prompts: list[Any], principles: list[Any]) -> tuple[dict[str, dict[str, float]], list[str]]:
    """({"red_team"|"ordinary"|"all": violation_rate}, responses): greedy responses to the held-out prompts, scored."""
    responses = generate_many([p.text for p in prompts])
    groups = {"red_team": [r for r, p in zip(responses, prompts) if p.kind != ORDINARY],
              "ordinary": [r for r, p in zip(responses, prompts) if p.kind == ORDINARY], "all": responses}
    return {name: violation_rate(texts, principles) for name, texts in groups.items() if texts}, responses


def _suite_model(name: str, like: Any) -> tuple[Any, Any] | None:
    """(decoder, tokenizer) when `name` is a suite run folder or a .ckpt in one (on the chat model's device), else
    None: a Hugging Face model's name or folder."""
    path = Path(name)
    if not (path.suffix == ".ckpt" or (path / "run.json").is_file()):
        return None
    return load_model(path, next(like.parameters()).device)


def _critic(name: str | None, model: Any, tokenizer: Any, max_new_tokens: int, temperature: float, seed: int) -> Any:
    suite = _suite_model(name, model) if name is not None else (model, tokenizer)
    if suite is None:
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {}
        return hf_generator(name, max_new_tokens, **sampling)
    return decoder_generator(*suite, max_new_tokens, temperature=temperature, seed=seed)


def _judge(name: str | None, model: Any, tokenizer: Any) -> Any:
    suite = _suite_model(name, model) if name is not None else (model, tokenizer)
    return hf_logprob(name) if suite is None else decoder_logprob(*suite, chat=is_chat_tokenizer(suite[1]))


def measure(config: CAIConfig, seed: int, run_dir: Path) -> Findings:
    s = config.cai
    args = _load_spec(run_dir).trainer
    device = "cuda" if on_gpu(args) else "cpu"
    principles = load_constitution(s.constitution)
    sft_dir = chat_model_stage(config, seed, run_dir)
    chat, tokenizer = load_model(sft_dir, device, arm="full")
    train, held_out = split(s.n_train, s.n_held_out, seed)
    texts = [p.text for p in train]

    # SL-CAI: the chat model's responses, critiqued and revised; the final revisions are the data
    responses = decoder_generator(chat, tokenizer, s.max_new_tokens)(texts)
    critic = _critic(s.critic, chat, tokenizer, s.max_new_tokens, s.critic_temperature, seed)
    chains = critique_revise_batch(critic, texts, responses, principles, s.rounds, random.Random(f"cai-{seed}"))
    rows = build_sl_data(texts, chains)
    source = run_dir / "sl_cai.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sl_model, sl_stats = sl_cai(chat, tokenizer, source, s.sl, seed, run_dir)

    # RL-CAI: two samples of SL-CAI per prompt, labelled by the judge's answer to the principle's question
    sample = lambda offset: decoder_generator(sl_model, tokenizer, s.max_new_tokens, temperature=s.rl.temperature,
                                              seed=seed * 1_000_003 + offset)(texts)
    judge = _judge(s.judge, chat, tokenizer)
    records = build_preference_pairs(judge, texts, list(zip(sample(0), sample(500_000))), principles,
                                     random.Random(f"cai-feedback-{seed}"), s.rl.min_margin)
    (run_dir / "rl_cai_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    agreement, separated = checker_agreement(records, principles)
    rl_model, rl_stats = rl_cai(sl_model, tokenizer, records, s.rl, seed, run_dir)

    # the same held-out prompts, greedy, for every model
    results, held_responses, helpful = {}, {}, {}
    for name, model in (("base", chat), ("sl-cai", sl_model), ("rl-cai", rl_model)):
        results[name], held_responses[name] = rates(decoder_generator(model, tokenizer, s.max_new_tokens), held_out, principles)
        helpful[name] = helpfulness(held_responses[name], held_out)

    n_red = sum(p.kind != ORDINARY for p in held_out)
    metrics: dict[str, Any] = {"data/sl_rows": len(rows), "data/train_prompts": len(texts), "data/held_out_prompts": len(held_out),
                               "data/held_out_red_team": n_red, "data/pairs": len(records),
                               "feedback/checker_agreement": agreement, "feedback/checker_separated_pairs": separated,
                               **{f"sl/{k}": v for k, v in sl_stats.items()}, **{f"rl/{k}": v for k, v in rl_stats.items()}}
    for name, by_group in results.items():  # every rate is in cai.json; the report keeps "any" per group, each principle on all
        metrics |= {f"violations/{name}/{group}/{ANY}": rates_[ANY] for group, rates_ in by_group.items()}
        metrics |= {f"violations/{name}/all/{p}": v for p, v in by_group["all"].items() if p != ANY}
    for name, values in helpful.items():
        metrics |= {f"helpfulness/{name}/{k}": v for k, v in values.items()}
    group = "red_team" if n_red else "all"
    base, sl, rl = (results[m][group][ANY] for m in ("base", "sl-cai", "rl-cai"))
    claims = _claims(base, sl, rl, n_red or len(held_out), helpful, len(held_out) - n_red)

    names = [p.name for p in checkable(principles)]
    table = [f"| model | any, red-team | any, ordinary | any, all | {' | '.join(names)} |",
             "|---|---:|---:|---:|" + "---:|" * len(names)]
    for name, by_group in results.items():
        cell = lambda g: f"{by_group[g][ANY]:.3f}" if g in by_group else "—"
        per_principle = " | ".join(f"{by_group['all'][p]:.3f}" for p in names)
        table.append(f"| {name} | {cell('red_team')} | {cell('ordinary')} | {cell('all')} | {per_principle} |")
    samples = []
    for prompt, chain in list(zip(texts, chains))[:SAMPLES_SHOWN]:
        samples.append(f"- prompt {json.dumps(prompt)}; response {json.dumps(chain[0].response)}")
        samples += [f"  - {step.principle}: critique {json.dumps(step.critique)} -> revision {json.dumps(step.revision)}"
                    for step in chain]
    fmt = lambda v, spec: "—" if v is None else format(v, spec)
    helpful_table = ["| model | task accuracy, ordinary | mean words | one word or none |", "|---|---:|---:|---:|",
                     *(f"| {name} | {fmt(h['task_accuracy'], '.3f')} | {fmt(h['mean_words'], '.1f')} | {fmt(h['one_word_share'], '.3f')} |"
                       for name, h in helpful.items())]
    sections = {"Violation rates on held-out prompts": [
                    f"Share of greedy responses that a checker flags, per principle on all {len(held_out)} held-out prompts, "
                    f"and for any principle on the {n_red} red-team and {len(held_out) - n_red} ordinary ones.", "", *table],
                "Helpfulness on held-out prompts": [
                    f"Exact answers to the {len(held_out) - n_red} ordinary prompts (verifiable tasks; `datamodules/red_team.py::"
                    "helpfulness`), and the responses' length on all of them: a model can stop violating by saying "
                    "nothing, which the violation rates would count as harmless.", "", *helpful_table],
                "Critique and revision samples": samples}
    notes = [f"Chat model (base): the sft stage at {sft_dir}. Critic: {s.critic or 'the chat model'}; judge: "
             f"{s.judge or 'the chat model'}. {len(rows)} SL-CAI rows from {len(texts)} training prompts "
             f"({s.rounds} round(s)); {len(records)} AI-labelled pairs; {s.sl.steps} SL steps, {s.rl.steps} DPO steps "
             f"(beta {s.rl.beta}).",
             f"AI labels agree with the checkers on {'—' if agreement is None else f'{agreement:.3f}'} of the {separated} "
             "pairs whose drawn principle's checker flags exactly one response."]
    notes += [f"{name} was not trained (no {what}): it is {start}, unchanged." for name, stats, what, start in
              (("SL-CAI", sl_stats, "non-empty revision that fits the context", "the chat model"),
               ("RL-CAI", rl_stats, "AI-labelled pair of two different responses", "SL-CAI")) if not stats["trained"]]
    (run_dir / "cai.json").write_text(json.dumps(
        {"config": asdict(config), "sft_stage": str(sft_dir), "metrics": metrics, "rates": results,
         "held_out": [{"prompt": p.text, "kind": p.kind, **{m: held_responses[m][i] for m in held_responses}}
                      for i, p in enumerate(held_out)],
         "chains": [[asdict(step) for step in chain] for chain in chains], "pairs": records,
         "claims": [asdict(c) for c in claims]}, indent=2, default=str))
    return Findings(metrics=metrics, claims=claims, notes=notes, sections=sections)


def _claims(base: float, sl: float, rl: float, n: int, helpful: dict[str, dict[str, float | None]], n_ordinary: int) -> list[Any]:
    half = 0.5 / max(1, n)  # rates are counts / n: rl <= sl exactly when rl < sl + half a prompt
    kept = "RL-CAI stays about as helpful as the chat model"
    metric = "held-out ordinary prompts answered exactly, RL-CAI"
    paper = "RL-CAI is more harmless at a similar helpfulness (Fig. 2: harmlessness gains, helpfulness Elo close)"
    base_accuracy, rl_accuracy = helpful["base"]["task_accuracy"], helpful["rl-cai"]["task_accuracy"]
    if base_accuracy is None or rl_accuracy is None or base_accuracy == 0:
        helpfulness_claim = not_measured(kept, SOURCE, metric, paper, "no held-out ordinary prompt" if base_accuracy is None
                                         else "the chat model answers no ordinary prompt exactly: nothing to keep")
    else:  # at least 80% of the chat model's accuracy, less half a prompt of slack for the count
        helpfulness_claim = check_above(claim=kept, source=SOURCE, metric=metric, measured=rl_accuracy,
                                        bound=base_accuracy - 0.5 / max(1, n_ordinary), factor=0.8, paper=paper,
                                        bound_name="the chat model's accuracy less half a prompt")
    return [
        check_below(claim="SL-CAI (critique-revise) lowers harmful outputs below the chat model's", source=SOURCE,
                    metric="held-out red-team prompts whose greedy response violates any checked principle, SL-CAI",
                    measured=sl, bound=base, factor=1.0, paper="SL-CAI is more harmless than the helpful RLHF model",
                    bound_name="the base (SFT) rate"),
        check_below(claim="RL-CAI (AI feedback) is at least as harmless as SL-CAI", source=SOURCE,
                    metric="held-out red-team prompts whose greedy response violates any checked principle, RL-CAI",
                    measured=rl, bound=sl + half, factor=1.0, paper="RL-CAI improves harmlessness over SL-CAI",
                    bound_name="SL-CAI's rate plus half a prompt (at or below)"),
        helpfulness_claim,
    ]


register(
    Technique(
        name="cai",
        summary="Constitutional AI: critique-revise (SL-CAI) and AI-feedback DPO (RL-CAI) from a written constitution",
        config=CAIConfig,
        measure=measure,
        aliases=("constitutional-ai",),
        distributed=False,
    )
)
