"""Evaluation through lm-eval: the adapter's scores are the model's own, its command line and the Python
call agree, task errors say what to fix, builtin tasks run on local files, task rows are reproducible."""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

import evaluation.lm  # noqa: F401  registers "llm-repro"
from datamodules.verifiable import arithmetic_choices
from evaluation import TASKS_DIR
from evaluation.build_tasks import build, load, task_rows
from evaluation.lm import EOT_ID, ReproLM
from evaluation.standard_tasks import BUILTIN, local
from evaluation.task_checks import TaskConfigError, missing_fields
from modules.decoding.generation import generate
from repro.checkpoints import load_model
from repro.config import ConfigError
from repro.evaluate import evaluate, main
from repro.golden import SHRINK
from repro.runner import RunSpec, run

TINY = [
    *SHRINK,  # 2 layers, 32 wide, block 32, 12 steps, lm-eval off (the tests below evaluate it)
    "data.vocab_size=320",
    "model.pad_vocab_to=128",  # logits past the vocabulary exist, and must be left out
    "train.val_every=12",
    "train.speed_window=2",
]


@pytest.fixture(scope="module")
def run_dir(text_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide model after 12 steps on the small corpus (block size 32)."""
    out = tmp_path_factory.mktemp("eval")
    overrides = [f"data.source={text_corpus}", f"data.cache_dir={out / 'cache'}", *TINY]
    return run(RunSpec("pretrain", "tiny", overrides, seed=1), out=out / "runs")


@pytest.fixture
def only_our_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    """TaskManagers that index the suite's task folders but not lm-eval's 14,000 builtin YAML files
    (10-15 s on this CPU); no test here evaluates a builtin task by name."""
    import lm_eval.tasks

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(lm_eval.tasks.TaskManager, include_defaults=False))


def scrambled(lm: ReproLM) -> ReproLM:
    """The adapter with seeded N(0, 1) matrices. The 12-step model predicts spaces almost everywhere;
    these weights give varied greedy tokens and clear margins, so the comparisons below can fail."""
    torch.manual_seed(0)
    with torch.no_grad():
        for module in lm.model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0.0, 1.0)
    return lm


def log_probs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """float64 next-token log-probabilities (len(ids), vocab_size) of one unpadded row."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, :, : model.config.vocab_size]  # (T, vocab_size)
    return logits.double().log_softmax(-1)


def direct_loglikelihood(model, bpe, context: str, continuation: str, max_length: int) -> tuple[float, bool]:
    """log p(continuation | context) and whether every continuation token is the argmax, one request alone.

    Tokens as lm-eval splits them (contexts here end in no space): the continuation is what the
    tokens of context + continuation add to the context's own; an empty context is the EOT token.
    The model reads at most `max_length` tokens, the last ones before the final continuation token.
    """
    context_ids = bpe.encode(context).ids if context else [EOT_ID]
    whole = bpe.encode(context + continuation).ids
    continuation_ids = whole[len(context_ids) :] if context else whole
    ids = (context_ids + continuation_ids)[-(max_length + 1) :]
    lp = log_probs(model, ids[:-1])[-len(continuation_ids) :]  # (n, vocab): rows that predict the continuation
    target = torch.tensor(continuation_ids)
    return float(lp[torch.arange(len(target)), target].sum()), bool((lp.argmax(-1) == target).all())


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_equals_the_models_own_log_probs(run_dir: Path) -> None:
    lm = scrambled(ReproLM(str(run_dir), device="cpu", batch_size=3))
    greedy, partly = [], []  # continuations that are the greedy tokens, and ones whose first token only is
    for context in ["import", "class Foo", "The", "hello"]:
        ids = lm.bpe.encode(context).ids
        new = generate(lm.model, [ids], 2)[0]
        if lm.bpe.encode(context + lm.tok_decode(new)).ids == ids + new:  # the tokens survive decode + encode
            greedy.append((context, lm.tok_decode(new)))
        if lm.bpe.encode(context + lm.tok_decode(new[:1]) + " end").ids[: len(ids) + 1] == ids + new[:1]:
            partly.append((context, lm.tok_decode(new[:1]) + " end"))
    long = "\n".join(f"value_{i} = compute(value_{i - 1}, {i})" for i in range(1, 8))  # > max_length tokens
    pairs = [("def main(", "args):"), ("import", " os"), ("", "hello world"), (long, "\nprint(value_7)"), *greedy, *partly]
    assert len(lm.bpe.encode(long).ids) > lm.max_length and greedy and partly

    got = lm.loglikelihood(requests("loglikelihood", pairs))
    expected = [direct_loglikelihood(lm.model, lm.bpe, c, x, lm.max_length) for c, x in pairs]
    assert {flag for _, flag in expected} == {True, False}
    for (context, continuation), (ll, is_greedy), (ref_ll, ref_greedy) in zip(pairs, got, expected):
        assert ll == pytest.approx(ref_ll, abs=1e-4), (context, continuation)
        assert is_greedy == ref_greedy, (context, continuation)


def rolling_reference(model, tokens: list[int], max_length: int) -> float:
    """log p(tokens) in lm-eval's disjoint rolling windows: consecutive chunks of `max_length` predicted
    tokens, the first read after an EOT; each chunk's input is the `max_length` tokens ending just
    before its last token, so a short last chunk reads back into the chunk before it."""
    padded = [EOT_ID, *tokens]  # padded[i] is the token before tokens[i]
    total = 0.0
    for start in range(0, len(tokens), max_length):
        end = min(start + max_length, len(tokens))
        lp = log_probs(model, padded[max(0, end - max_length) : end])[-(end - start) :]  # (end - start, vocab)
        total += float(lp[torch.arange(end - start), torch.tensor(tokens[start:end])].sum())
    return total


def test_loglikelihood_rolling_sums_disjoint_windows(run_dir: Path) -> None:
    window = 8
    lm = scrambled(ReproLM(str(run_dir), device="cpu", batch_size=4, max_length=window))
    texts = ["for line in lines:\n    if line.strip():\n        yield line.split(',')", "import os"]
    tokens = [lm.bpe.encode(t).ids for t in texts]
    assert len(tokens[0]) > 2 * window and len(tokens[0]) % window != 0 and len(tokens[1]) < window

    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]))
    for ids, value in zip(tokens, got):
        assert value == pytest.approx(rolling_reference(lm.model, ids, window), abs=1e-4)
    # a text that fits one window is the continuation of an empty context (scored in another batch
    # shape, so float32 kernels round differently: 2.3e-5 apart on an AMD EPYC, hence the reference's 1e-4)
    [(short, _)] = lm.loglikelihood(requests("loglikelihood", [("", texts[1])]))
    assert got[1] == pytest.approx(short, abs=1e-4)
    # and a longer max_length reads more context: the windows change the score
    wide = ReproLM(str(run_dir), device="cpu", batch_size=4)
    wide.model = lm.model
    assert wide.loglikelihood_rolling(requests("loglikelihood_rolling", [(texts[0],)]))[0] != pytest.approx(got[0], abs=1e-3)


def test_generate_until_is_greedy_generate_cut_at_until(run_dir: Path) -> None:
    lm = scrambled(ReproLM(str(run_dir), device="cpu", batch_size=2))
    long = " ".join(f"word{i}" for i in range(40))  # longer than block_size: cut from the left
    contexts = ["def main(", "import os\nimport sys", "The quick brown fox", "x", long]

    def reference(context: str, max_new: int, until: list[str]) -> str:
        ids = lm.bpe.encode(context).ids[-(lm.max_length - max_new) :]
        text = lm.bpe.decode(generate(lm.model, [ids], max_new, eos_id=EOT_ID)[0])
        for stop in until:
            text = text.split(stop)[0]
        return text

    uncut = reference(contexts[0], 10, [])
    until = [uncut[3:5]]  # occurs in the first context's continuation at least
    settings = [{"until": until, "max_gen_toks": 10, "do_sample": False}, {"until": ["\n\n"], "max_gen_toks": 4}]
    args = [(c, settings[i % 2]) for i, c in enumerate(contexts)]

    got = lm.generate_until(requests("generate_until", args))
    expected = [reference(c, s["max_gen_toks"], s["until"]) for c, s in args]
    assert got == expected
    assert len(got[0]) <= 3 < len(uncut)  # the cut happened


def results_file(folder: Path) -> dict:
    (path,) = folder.glob("**/results_*.json")
    return json.loads(path.read_text())


def metric_values(results: dict) -> dict[str, float]:
    """{"task metric,filter": value} of every metric, stderr left out."""
    return {
        f"{task} {key}": value
        for task, metrics in results["results"].items()
        for key, value in metrics.items()
        if "," in key and "_stderr" not in key
    }


def test_command_line_and_python_call_give_the_same_numbers(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, only_our_tasks: None
) -> None:
    from evaluation.__main__ import cli_evaluate

    lm_eval_log = logging.getLogger("lm_eval")  # lm-eval's command line stops it propagating to the root logger
    lm_eval_log.addHandler(caplog.handler)
    tasks = "repro_cloze,repro_verifiable_arithmetic_mc"
    try:
        argv = ["lm_eval", "--model", "llm-repro", "--model_args", f"checkpoint={run_dir}", "--tasks", tasks]
        argv += ["--include_path", str(TASKS_DIR), "--limit", "8", "--batch_size", "4", "--device", "cpu"]
        monkeypatch.setattr(sys, "argv", [*argv, "--output_path", str(tmp_path / "cli")])
        cli_evaluate()
        argv = ["--checkpoint", str(run_dir), "--tasks", tasks, "--limit", "8", "--batch-size", "4", "--device", "cpu"]
        assert main([*argv, "--out", str(tmp_path / "py")]) == 0
    finally:
        lm_eval_log.removeHandler(caplog.handler)

    cli = metric_values(results_file(tmp_path / "cli"))
    python = json.loads((tmp_path / "py" / "eval.json").read_text())
    assert set(cli) == {f"{t} {m},none" for t in tasks.split(",") for m in ("acc", "acc_norm", "perplexity")} - {
        "repro_cloze acc_norm,none",
        "repro_verifiable_arithmetic_mc perplexity,none",
    }
    assert metric_values(python) == cli
    assert python["config"]["model_batch_size"] == 4 and python["config"]["limit"] == 8
    assert python["task_data"]["rows"]["repro_cloze"] > 8  # rows built from the run's own held-out corpus
    table = (tmp_path / "py" / "eval.md").read_text()
    for key, value in cli.items():
        task, metric = key.removesuffix(",none").split()
        assert f"| {task} | {metric} | {value:.4g} |" in table
    assert "batch size 4, limit 8" in table
    # lm-eval's hint that tasks with a custom_dataset can take --metadata, once per task, is filtered out
    assert not [r for r in caplog.records if "--metadata" in r.getMessage()]


BAD_TASK = """\
task: repro_bad
dataset_path: json
dataset_kwargs:
  data_files: {test: rows.jsonl}
test_split: test
output_type: loglikelihood
doc_to_text: "{{text}}"
"""


def test_incomplete_task_yaml_is_a_clear_error(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, only_our_tasks: None
) -> None:
    (tmp_path / "repro_bad.yaml").write_text(BAD_TASK)
    monkeypatch.setattr(evaluation.lm, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    with pytest.raises(TaskConfigError, match="doc_to_target") as err:
        evaluate(run_dir, ["repro_bad"], include_path=tmp_path)
    assert isinstance(err.value, ConfigError)
    assert "'repro_bad'" in str(err.value) and str(tmp_path / "repro_bad.yaml") in str(err.value)

    assert main(["--checkpoint", str(run_dir), "--tasks", "repro_bad", "--include-path", str(tmp_path)]) == 2
    out, errors = capsys.readouterr()
    assert out == "" and errors.count("\n") == 1 and errors.startswith("error: task 'repro_bad'")
    assert "doc_to_target" in errors


def test_unknown_task_suggests_the_close_match(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, only_our_tasks: None
) -> None:
    with pytest.raises(TaskConfigError, match="Did you mean 'repro_cloze'"):
        evaluate(run_dir, "repro_cloze,repro_clozee")
    with pytest.raises(TaskConfigError, match="no tasks given. Valid repro tasks: .*repro_cloze"):
        evaluate(run_dir, " , ")
    # a YAML that lm-eval skips in silence: the message says why
    (tmp_path / "repro_untitled.yaml").write_text(BAD_TASK.replace("task: repro_bad\n", ""))
    assert main(["--checkpoint", str(run_dir), "--tasks", "repro_untitled", "--include-path", str(tmp_path)]) == 2
    errors = capsys.readouterr().err
    assert errors.count("\n") == 1 and "repro_untitled.yaml exists but has no `task:` field" in errors


def test_corpus_perplexity_task_scores_documents_in_rolling_windows(run_dir: Path) -> None:
    results = evaluate(run_dir, "repro_corpus_ppl", limit=2, batch_size=8, device="cpu")
    scores = results["results"]["repro_corpus_ppl"]
    rows = Path(results["task_data"]["path"], "repro_corpus_ppl.jsonl").read_text().splitlines()[:2]
    texts = [json.loads(row)["text"] for row in rows]
    model, bpe = load_model(run_dir)
    ll = sum(rolling_reference(model, bpe.encode(t).ids, model.config.block_size) for t in texts)
    n_bytes, n_words = sum(len(t.encode()) for t in texts), sum(len(re.split(r"\s+", t)) for t in texts)
    assert scores["bits_per_byte,none"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-5)
    assert scores["byte_perplexity,none"] == pytest.approx(math.exp(-ll / n_bytes), rel=1e-5)
    assert scores["word_perplexity,none"] == pytest.approx(math.exp(-ll / n_words), rel=1e-4)


def test_data_dir_replaces_the_rows_of_the_runs_corpus(run_dir: Path, text_corpus: Path, tmp_path: Path) -> None:
    texts = [p.read_text() for p in sorted(text_corpus.glob("*.txt"))]
    folder = build(tmp_path / "rows", texts, seed=3, n=5)
    results = evaluate(run_dir, "repro_verifiable_arithmetic_mc", batch_size=4, device="cpu", data_dir=folder)
    assert results["task_data"] == {"path": str(folder), **json.loads((folder / "manifest.json").read_text())}
    docs = [sample["doc"] for sample in sorted(results["samples"]["repro_verifiable_arithmetic_mc"], key=lambda s: s["doc_id"])]
    assert docs == arithmetic_choices(5, seed=3)


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_builtin_tasks_score_local_files_in_their_own_format(run_dir: Path, tmp_path: Path) -> None:
    model, bpe = load_model(run_dir)
    block = model.config.block_size

    def ll(context: str, continuation: str) -> tuple[float, bool]:
        return direct_loglikelihood(model, bpe, context, continuation, block)

    def gold_half_right(contexts: list[str], choices: list[list[str]]) -> list[int]:
        """Gold answers that the model gets right on the first half of the rows and wrong on the rest."""
        golds = []
        for i, (context, options) in enumerate(zip(contexts, choices)):
            scores = [ll(context, " " + c)[0] for c in options]
            pick = max if i < len(contexts) // 2 else min
            golds.append(pick(range(len(options)), key=scores.__getitem__))
        return golds

    def accuracy(contexts, choices, golds, normalize: bool = False) -> float:
        """lm-eval's acc (argmax log-likelihood) and acc_norm (per character of the choice)."""
        right = 0
        for context, options, gold in zip(contexts, choices, golds):
            scores = [ll(context, " " + c)[0] / (len(c) if normalize else 1) for c in options]
            right += max(range(len(options)), key=scores.__getitem__) == gold
        return right / len(golds)

    passages = [
        "The function returns the value of the first argument",
        "Each line of the file is read into a list of strings",
        "A string that holds the name of the module",
        "If the key is missing the default is returned instead of an error",
    ]
    lambada = jsonl(tmp_path / "lambada.jsonl", [{"text": t} for t in passages])

    questions = ["What does print do?", "Which keyword defines a function?", "What is a list?", "What is 2 + 2?"]
    arc_choices = [["writes text", "reads a file", "sorts"], ["def", "class", "lambda", "import"], ["a sequence", "a number"], ["4", "5", "22"]]
    arc_golds = gold_half_right([f"Question: {q}\nAnswer:" for q in questions], arc_choices)
    labels = "ABCD"
    arc = jsonl(
        tmp_path / "arc.jsonl",
        [
            {"id": str(i), "question": q, "choices": {"text": c, "label": list(labels[: len(c)])}, "answerKey": labels[g]}
            for i, (q, c, g) in enumerate(zip(questions, arc_choices, arc_golds))
        ],
    )

    # hellaswag's process_docs builds "<activity>: <ctx_a> <Ctx_b>" (plain text here, so its cleanup changes nothing)
    swag = [("Cooking", "A man cuts an onion.", "he", ["puts it in a pan.", "sings a song.", "reads the paper.", "runs away."])] * 2
    swag += [("Coding", "She opens the editor.", "then she", ["types a function.", "closes the door.", "eats lunch.", "sleeps."])] * 2
    swag_contexts = [f"{a}: {x} {y.capitalize()}" for a, x, y, _ in swag]
    swag_golds = gold_half_right(swag_contexts, [e for *_, e in swag])
    hellaswag = jsonl(
        tmp_path / "hellaswag.jsonl",
        [{"activity_label": a, "ctx_a": x, "ctx_b": y, "endings": e, "label": str(g)} for (a, x, y, e), g in zip(swag, swag_golds)],
    )

    tasks = [local("lambada_openai", lambada), local("arc_easy", arc), local("hellaswag", hellaswag)]
    results = evaluate(run_dir, tasks, batch_size=3, device="cpu")["results"]

    lambada_scores = [ll(" ".join(t.split(" ")[:-1]), " " + t.split(" ")[-1]) for t in passages]
    lambada_result = results["lambada_openai_local"]
    assert lambada_result["perplexity,none"] == pytest.approx(math.exp(-sum(s for s, _ in lambada_scores) / 4), rel=1e-4)
    assert lambada_result["acc,none"] == sum(g for _, g in lambada_scores) / 4
    for name, contexts, choices, golds in [
        ("arc_easy_local", [f"Question: {q}\nAnswer:" for q in questions], arc_choices, arc_golds),
        ("hellaswag_local", swag_contexts, [e for *_, e in swag], swag_golds),
    ]:
        assert results[name]["acc,none"] == accuracy(contexts, choices, golds) == 0.5
        assert results[name]["acc_norm,none"] == accuracy(contexts, choices, golds, normalize=True)


@pytest.mark.parametrize("task", sorted(BUILTIN))
def test_every_local_config_is_complete(task: str, tmp_path: Path) -> None:
    config = local(task, tmp_path / "rows.jsonl")
    assert missing_fields(config) == []
    assert config["task"] == f"{task}_local" and config["dataset_kwargs"] == {"data_files": {"test": str(tmp_path / "rows.jsonl")}}
    assert "training_split" not in config and "validation_split" not in config
    with pytest.raises(TaskConfigError, match="known: lambada_openai"):
        local("no_such_task", tmp_path / "rows.jsonl")


def test_task_rows_repeat_for_a_seed_and_answers_are_right(text_corpus: Path, tmp_path: Path) -> None:
    texts = [p.read_text() for p in sorted(text_corpus.glob("*.txt"))]
    first, again = build(tmp_path / "a", texts, seed=0, n=30), build(tmp_path / "b", texts, seed=0, n=30)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in again.iterdir()) and len(names) == 9  # 8 tasks + manifest
    assert all((first / n).read_bytes() == (again / n).read_bytes() for n in names)
    other = task_rows(texts, seed=1, n=30)
    rows = task_rows(texts, seed=0, n=30)
    for name in rows:
        assert len(rows[name]) > 0
        if name.startswith("repro_verifiable_"):
            assert len(rows[name]) == 30 and rows[name] != other[name], name
    assert [json.loads(line) for line in (first / "repro_cloze.jsonl").read_text().splitlines()] == rows["repro_cloze"]
    assert load("repro_cloze.jsonl", data_dir=str(first))["test"].to_list() == rows["repro_cloze"]
    with pytest.raises(FileNotFoundError, match="evaluation.build_tasks --out"):
        load("repro_nothing.jsonl", data_dir=str(first))

    for row in rows["repro_cloze"]:  # lambada-style: the passage ends in a word of 3+ letters after a space
        assert re.search(r" [A-Za-z]{3,}$", row["text"]), row
    for row in rows["repro_verifiable_arithmetic"]:
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", row["question"]).groups()
        assert int(row["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    for row in rows["repro_verifiable_arithmetic_mc"]:
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", row["question"]).groups()
        assert row["choices"][row["label"]] == row["answer"] == str(int(a) + int(b) if op == "+" else int(a) - int(b))
        assert len(set(row["choices"])) == 4
    for row in rows["repro_verifiable_copy"]:
        assert row["answer"] == row["question"].removeprefix("Repeat the words: ")
    for row in rows["repro_verifiable_reverse"]:
        assert row["answer"].split() == row["question"].removeprefix("Reverse the words: ").split()[::-1]
    for row in rows["repro_verifiable_sort"]:
        values = [int(v) for v in row["question"].removeprefix("Sort ascending: ").split()]
        assert [int(v) for v in row["answer"].split()] == sorted(values)
    for row in rows["repro_verifiable_count_letter"]:
        letter, word = re.fullmatch(r"How many times does the letter (\w) appear in (\w+)\?", row["question"]).groups()
        assert int(row["answer"]) == word.count(letter)
    assert any(row["answer"] == "0" for row in rows["repro_verifiable_count_letter"])


def test_default_tasks_are_the_runs_own(run_dir: Path, tmp_path: Path) -> None:
    """Without --tasks a run is scored on its config's eval.tasks, else on its technique's tasks."""
    import shutil

    import yaml

    from repro.evaluate import default_tasks
    from repro.registry import get

    assert default_tasks(run_dir) == list(get("pretrain").eval_tasks)
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("*.ckpt"))
    (copy / "checkpoints" / "final.ckpt").touch()
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["eval"]["tasks"] = ["repro_cloze"]
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    assert default_tasks(copy) == ["repro_cloze"]


def test_a_model_in_memory_scores_as_its_checkpoint_does(run_dir: Path) -> None:
    """`evaluate_model` (what the inference technique scores quantized copies with) reads the run's held-out
    rows through the same harness: the unquantized model in memory scores exactly as the checkpoint; an int4
    copy scores close to it but not equal."""
    from modules.nn.quant import quantize
    from repro.evaluate import evaluate_model

    model, bpe = load_model(run_dir)
    on_disk = evaluate(run_dir, "repro_corpus_ppl", limit=2, batch_size=8, device="cpu")["results"]["repro_corpus_ppl"]
    in_memory = evaluate_model(model, bpe, run_dir, "float", ["repro_corpus_ppl"], limit=2, batch_size=8, device="cpu")
    assert in_memory["repro_corpus_ppl/bits_per_byte"] == pytest.approx(on_disk["bits_per_byte,none"], rel=1e-6)
    group = math.gcd(model.config.n_embd, 4 * model.config.n_embd)
    int4 = evaluate_model(quantize(model, "int4", group_size=min(group, 32)), bpe, run_dir, "int4", ["repro_corpus_ppl"],
                          limit=2, batch_size=8, device="cpu")
    assert int4["repro_corpus_ppl/bits_per_byte"] != in_memory["repro_corpus_ppl/bits_per_byte"]
    assert int4["repro_corpus_ppl/bits_per_byte"] == pytest.approx(in_memory["repro_corpus_ppl/bits_per_byte"], rel=0.1)
