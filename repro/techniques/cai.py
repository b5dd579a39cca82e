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
from typing import Any, Mapping

from datamodules.cai import (build_preference_pairs, build_sl_data, checker_agreement, critique_revise_batch, decoder_generator,
                             decoder_logprob, hf_generator, hf_logprob, to_pairs)
from datamodules.chat import END, is_chat_tokenizer
from datamodules.constitution import ANY, checkable, load_constitution, violation_rate
from datamodules.preference import PreferenceDataConfig, PreferenceDataModule
from datamodules.red_team import ORDINARY, helpfulness, split
from datamodules.sft import SFTDataConfig, SFTDataModule
from modules.training.dpo import DPOModule, DPOSettings
from modules.training.sft import LoraSettings, SFTModule, SFTOptimConfig
from reports.claims import ClaimResult, check_above, check_below, not_measured
from repro import registry
from repro.checkpoints import load_model
from repro.registry import Finished, Fit, Measured, Step, Technique, register
from repro.runner import RunSpec, _load_spec, stage_checkpoint, train_fit
from repro.techniques.dpo import with_reference
from repro.trainer import TrainConfig

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


@dataclass
class CAIRun:
    """What a cai run's steps hand on to one another: the runner's `Finished` carries metrics, and these are models,
    prompts and generations, kept in `Finished.state["cai"]` from the "chat model" step to the "report" step."""

    principles: list[Any]
    sft_dir: Path
    chat: Any  # the chat model (base): the sft stage's decoder
    tokenizer: Any
    train: list[Any]  # training prompts (critique-revise, then AI-feedback pairs)
    held_out: list[Any]  # held-out prompts every model is scored on
    chains: list[list[Any]] = field(default_factory=list)  # critique-revision steps per training prompt
    sl_model: Any = None
    rl_model: Any = None
    records: list[dict] = field(default_factory=list)  # the AI-labelled pairs
    rates: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # model -> group -> principle -> rate
    responses: dict[str, list[str]] = field(default_factory=dict)  # model -> greedy responses to the held-out prompts
    helpful: dict[str, dict[str, float | None]] = field(default_factory=dict)

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.train]


def _chat_model(finished: Finished) -> Measured:
    """The chat model (the sft stage, trained once and reused), the constitution and the training / held-out prompts."""
    s, seed, run_dir = finished.config.cai, finished.seed, finished.run_dir
    principles = load_constitution(s.constitution)
    sft_dir = chat_model_stage(finished.config, seed, run_dir)
    chat, tokenizer = load_model(sft_dir, finished.device, arm="full")
    train, held_out = split(s.n_train, s.n_held_out, seed)
    finished.state["cai"] = CAIRun(principles, sft_dir, chat, tokenizer, train, held_out)
    return Measured({"data/train_prompts": len(train), "data/held_out_prompts": len(held_out),
                     "data/held_out_red_team": sum(p.kind != ORDINARY for p in held_out)})


def _sl_cai(finished: Finished) -> Measured:
    """SL-CAI: the chat model's responses, critiqued and revised; the final revisions (sl_cai.jsonl) fine-tune it."""
    run, s, seed = finished.state["cai"], finished.config.cai, finished.seed
    responses = decoder_generator(run.chat, run.tokenizer, s.max_new_tokens)(run.texts)
    critic = _critic(s.critic, run.chat, run.tokenizer, s.max_new_tokens, s.critic_temperature, seed)
    run.chains = critique_revise_batch(critic, run.texts, responses, run.principles, s.rounds, random.Random(f"cai-{seed}"))
    rows = build_sl_data(run.texts, run.chains)
    source = finished.run_dir / "sl_cai.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run.sl_model, stats = sl_cai(run.chat, run.tokenizer, source, s.sl, seed, finished.run_dir)
    return Measured({"data/sl_rows": len(rows), **{f"sl/{k}": v for k, v in stats.items()}})


def _rl_cai(finished: Finished) -> Measured:
    """RL-CAI: two samples of SL-CAI per prompt, labelled by the judge's answer to the principle's question
    (rl_cai_pairs.jsonl), train it from SL-CAI by DPO."""
    run, s, seed = finished.state["cai"], finished.config.cai, finished.seed
    sample = lambda offset: decoder_generator(run.sl_model, run.tokenizer, s.max_new_tokens, temperature=s.rl.temperature,
                                              seed=seed * 1_000_003 + offset)(run.texts)
    judge = _judge(s.judge, run.chat, run.tokenizer)
    run.records = build_preference_pairs(judge, run.texts, list(zip(sample(0), sample(500_000))), run.principles,
                                         random.Random(f"cai-feedback-{seed}"), s.rl.min_margin)
    (finished.run_dir / "rl_cai_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run.records))
    agreement, separated = checker_agreement(run.records, run.principles)
    run.rl_model, stats = rl_cai(run.sl_model, run.tokenizer, run.records, s.rl, seed, finished.run_dir)
    return Measured({"data/pairs": len(run.records), "feedback/checker_agreement": agreement,
                     "feedback/checker_separated_pairs": separated, **{f"rl/{k}": v for k, v in stats.items()}})


def _rates(finished: Finished) -> Measured:
    """The same held-out prompts, greedy, for every model: the checkers' violation rates and the helpfulness."""
    run, s = finished.state["cai"], finished.config.cai
    for name, model in (("base", run.chat), ("sl-cai", run.sl_model), ("rl-cai", run.rl_model)):
        run.rates[name], run.responses[name] = rates(decoder_generator(model, run.tokenizer, s.max_new_tokens), run.held_out,
                                                     run.principles)
        run.helpful[name] = helpfulness(run.responses[name], run.held_out)
    metrics: dict[str, Any] = {}
    for name, by_group in run.rates.items():  # every rate is in cai.json; the report keeps "any" per group, each principle on all
        metrics |= {f"violations/{name}/{group}/{ANY}": rates_[ANY] for group, rates_ in by_group.items()}
        metrics |= {f"violations/{name}/all/{p}": v for p, v in by_group["all"].items() if p != ANY}
    for name, values in run.helpful.items():
        metrics |= {f"helpfulness/{name}/{k}": v for k, v in values.items()}
    return Measured(metrics, sections=_rate_sections(run))


def _rate_sections(run: CAIRun) -> dict[str, list[str]]:
    """The report's tables of the held-out violation rates and helpfulness."""
    n_held, n_red = len(run.held_out), sum(p.kind != ORDINARY for p in run.held_out)
    names = [p.name for p in checkable(run.principles)]
    table = [f"| model | any, red-team | any, ordinary | any, all | {' | '.join(names)} |",
             "|---|---:|---:|---:|" + "---:|" * len(names)]
    for name, by_group in run.rates.items():
        cell = lambda g: f"{by_group[g][ANY]:.3f}" if g in by_group else "—"
        per_principle = " | ".join(f"{by_group['all'][p]:.3f}" for p in names)
        table.append(f"| {name} | {cell('red_team')} | {cell('ordinary')} | {cell('all')} | {per_principle} |")
    fmt = lambda v, spec: "—" if v is None else format(v, spec)
    helpful_table = ["| model | task accuracy, ordinary | mean words | one word or none |", "|---|---:|---:|---:|",
                     *(f"| {name} | {fmt(h['task_accuracy'], '.3f')} | {fmt(h['mean_words'], '.1f')} | {fmt(h['one_word_share'], '.3f')} |"
                       for name, h in run.helpful.items())]
    return {"Violation rates on held-out prompts": [
                f"Share of greedy responses that a checker flags, per principle on all {n_held} held-out prompts, "
                f"and for any principle on the {n_red} red-team and {n_held - n_red} ordinary ones.", "", *table],
            "Helpfulness on held-out prompts": [
                f"Exact answers to the {n_held - n_red} ordinary prompts (verifiable tasks; `datamodules/red_team.py::"
                "helpfulness`), and the responses' length on all of them: a model can stop violating by saying "
                "nothing, which the violation rates would count as harmless.", "", *helpful_table]}


def _report(finished: Finished) -> Measured:
    """The critique-revision samples and the notes for the report, and everything the run made in cai.json."""
    run, config, metrics = finished.state.pop("cai"), finished.config, finished.metrics
    samples = []
    for prompt, chain in list(zip(run.texts, run.chains))[:SAMPLES_SHOWN]:
        samples.append(f"- prompt {json.dumps(prompt)}; response {json.dumps(chain[0].response)}")
        samples += [f"  - {step.principle}: critique {json.dumps(step.critique)} -> revision {json.dumps(step.revision)}"
                    for step in chain]
    (finished.run_dir / "cai.json").write_text(json.dumps(
        {"config": asdict(config), "sft_stage": str(run.sft_dir),
         "metrics": {k: v for k, v in metrics.items() if not k.startswith("steps/")}, "rates": run.rates,
         "held_out": [{"prompt": p.text, "kind": p.kind, **{m: run.responses[m][i] for m in run.responses}}
                      for i, p in enumerate(run.held_out)],
         "chains": [[asdict(step) for step in chain] for chain in run.chains], "pairs": run.records,
         "claims": [asdict(c) for c in claims(config, metrics)]}, indent=2, default=str))
    return Measured(notes=_notes(config.cai, run.sft_dir, metrics), sections={"Critique and revision samples": samples})


def _notes(s: CAISettings, sft_dir: Path, metrics: Mapping[str, Any]) -> list[str]:
    agreement = metrics["feedback/checker_agreement"]
    notes = [f"Chat model (base): the sft stage at {sft_dir}. Critic: {s.critic or 'the chat model'}; judge: "
             f"{s.judge or 'the chat model'}. {metrics['data/sl_rows']} SL-CAI rows from {metrics['data/train_prompts']} "
             f"training prompts ({s.rounds} round(s)); {metrics['data/pairs']} AI-labelled pairs; {s.sl.steps} SL steps, "
             f"{s.rl.steps} DPO steps (beta {s.rl.beta}).",
             f"AI labels agree with the checkers on {'—' if agreement is None else f'{agreement:.3f}'} of the "
             f"{metrics['feedback/checker_separated_pairs']} pairs whose drawn principle's checker flags exactly one response."]
    return notes + [f"{name} was not trained (no {what}): it is {start}, unchanged." for name, trained, what, start in
                    (("SL-CAI", metrics["sl/trained"], "non-empty revision that fits the context", "the chat model"),
                     ("RL-CAI", metrics["rl/trained"], "AI-labelled pair of two different responses", "SL-CAI")) if not trained]


def claims(config: CAIConfig, metrics: Mapping[str, Any]) -> list[ClaimResult]:
    """SL-CAI below the chat model and RL-CAI at or below SL-CAI in held-out violations (on the red-team prompts, all of
    them when none is red-team), and RL-CAI's helpfulness kept."""
    n_held, n_red = metrics.get("data/held_out_prompts"), metrics.get("data/held_out_red_team")
    group = "red_team" if n_red else "all"
    base, sl, rl = (metrics.get(f"violations/{m}/{group}/{ANY}") for m in ("base", "sl-cai", "rl-cai"))
    half = 0.5 / max(1, n_red or n_held or 1)  # rates are counts / n: rl <= sl exactly when rl < sl + half a prompt
    return [
        check_below(claim="SL-CAI (critique-revise) lowers harmful outputs below the chat model's", source=SOURCE,
                    metric="held-out red-team prompts whose greedy response violates any checked principle, SL-CAI",
                    measured=sl, bound=base, factor=1.0, paper="SL-CAI is more harmless than the helpful RLHF model",
                    bound_name="the base (SFT) rate"),
        check_below(claim="RL-CAI (AI feedback) is at least as harmless as SL-CAI", source=SOURCE,
                    metric="held-out red-team prompts whose greedy response violates any checked principle, RL-CAI",
                    measured=rl, bound=None if sl is None else sl + half, factor=1.0,
                    paper="RL-CAI improves harmlessness over SL-CAI", bound_name="SL-CAI's rate plus half a prompt (at or below)"),
        _helpfulness_claim(metrics),
    ]


def _helpfulness_claim(metrics: Mapping[str, Any]) -> ClaimResult:
    """RL-CAI answers at least 80% as many held-out ordinary prompts exactly as the chat model, less half a prompt."""
    kept = "RL-CAI stays about as helpful as the chat model"
    metric = "held-out ordinary prompts answered exactly, RL-CAI"
    paper = "RL-CAI is more harmless at a similar helpfulness (Fig. 2: harmlessness gains, helpfulness Elo close)"
    base_accuracy, rl_accuracy = metrics.get("helpfulness/base/task_accuracy"), metrics.get("helpfulness/rl-cai/task_accuracy")
    if "helpfulness/base/task_accuracy" not in metrics:
        return not_measured(kept, SOURCE, metric, paper, "the held-out prompts were not scored")
    if base_accuracy is None or rl_accuracy is None or base_accuracy == 0:
        return not_measured(kept, SOURCE, metric, paper, "no held-out ordinary prompt" if base_accuracy is None
                            else "the chat model answers no ordinary prompt exactly: nothing to keep")
    n_ordinary = (metrics.get("data/held_out_prompts") or 0) - (metrics.get("data/held_out_red_team") or 0)
    return check_above(claim=kept, source=SOURCE, metric=metric, measured=rl_accuracy,
                       bound=base_accuracy - 0.5 / max(1, n_ordinary), factor=0.8, paper=paper,
                       bound_name="the chat model's accuracy less half a prompt")


register(
    Technique(
        name="cai",
        summary="Constitutional AI: critique-revise (SL-CAI) and AI-feedback DPO (RL-CAI) from a written constitution",
        config=CAIConfig,
        steps=(Step("chat model", _chat_model), Step("sl-cai", _sl_cai), Step("rl-cai", _rl_cai), Step("rates", _rates),
               Step("report", _report)),
        claims=claims,
        aliases=("constitutional-ai",),
        distributed=False,
    )
)
