"""SFT: the chat template, the loss mask, record formats and their errors, LoRA merge and adapters, a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from datamodules.chat import END, TAGS, add_chat_tokens, encode, read_records, render, verifiable_conversations
from datamodules.sft import collate, held_out_rows
from datamodules.sources import DataFormatError
from datamodules.tokenizer import train_bpe
from modules.nn import Decoder, DecoderConfig
from modules.nn.decoder import IGNORE
from modules.training.sft import LoraSettings, load_adapter, merged, save_adapter, trained_parameters, with_lora
from repro.golden import CORPUS, SHRINK, write_corpus
from repro.runner import RunSpec, run

MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Q: Repeat the words: apple bread\nA:"},
    {"role": "assistant", "content": "apple bread"},
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    texts = ["Answer briefly. Repeat the words: apple bread chair. Q: A: the cat sat on the mat " * 20]
    bpe = train_bpe(texts, 300)
    add_chat_tokens(bpe)
    return bpe


def test_loss_mask_covers_the_response_and_its_end_only(tokenizer) -> None:
    ids, labels = encode(tokenizer, MESSAGES)
    tag = {role: tokenizer.token_to_id(t) for role, t in TAGS.items()}
    end = tokenizer.token_to_id(END)
    system, user, answer = (tokenizer.encode(m["content"]).ids for m in MESSAGES)
    expected_ids = [tag["system"], *system, end, tag["user"], *user, end, tag["assistant"], *answer, end]
    assert ids == expected_ids
    supervised = [IGNORE] * (len(system) + 2 + len(user) + 2) + [IGNORE, *answer, end]
    assert labels == supervised  # token by token: only the answer's tokens and the closing <|end|>
    assert tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE], skip_special_tokens=False) == "apple bread" + END


def test_chat_template_round_trips(tokenizer) -> None:
    text = render(MESSAGES)
    assert text == "<|system|>Answer briefly.<|end|><|user|>Q: Repeat the words: apple bread\nA:<|end|><|assistant|>apple bread<|end|>"
    ids, _ = encode(tokenizer, MESSAGES)
    tokenizer.encode_special_tokens = False  # as a chat model reads text: its tags are special tokens
    assert tokenizer.encode(text).ids == ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    prompt = render(MESSAGES[:2], add_generation_prompt=True)
    assert prompt.endswith("<|end|><|assistant|>") and tokenizer.encode(prompt).ids == ids[: ids.index(tokenizer.token_to_id(TAGS["assistant"])) + 1]


def test_collate_pads_right_and_ignores_padding() -> None:
    batch = collate([([5, 6, 7], [IGNORE, 6, 7]), ([8, 9], [IGNORE, 9])], pad_id=3)
    assert batch["ids"].tolist() == [[5, 6, 7], [8, 9, 3]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, 9, IGNORE]]


def test_alpaca_and_chat_records_are_read_from_jsonl_and_parquet(tmp_path) -> None:
    import datasets

    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Sort ascending", "input": "3 1 2", "output": "1 2 3"},
        {"instruction": "Say hi", "output": "hi"},
    ]))
    assert read_records(str(alpaca)) == [
        [{"role": "user", "content": "Sort ascending\n\n3 1 2"}, {"role": "assistant", "content": "1 2 3"}],
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
    ]
    chat = tmp_path / "chat.parquet"
    datasets.Dataset.from_list([{"messages": MESSAGES}]).to_parquet(str(chat))
    assert read_records(str(chat)) == [MESSAGES]


@pytest.mark.parametrize("record, message", [
    ({"instruction": "Say hi"}, "needs a non-empty `output`"),
    ({"instruction": "Say hi", "output": "  "}, "needs a non-empty `output`"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "last message must be a non-empty assistant response"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "message 0 needs a role"),
    ({"prompt": "hi", "completion": "there"}, "not an instruction record"),
])
def test_malformed_record_names_file_and_record(tmp_path, record, message) -> None:
    path = tmp_path / "data.jsonl"
    good = {"instruction": "Say hi", "output": "hi"}
    path.write_text("\n".join(json.dumps(r) for r in [good, good, record]))
    with pytest.raises(DataFormatError) as err:
        read_records(str(path))
    assert f"{path}, record 3" in str(err.value) and message in str(err.value)


def test_training_conversations_share_no_prompt_with_the_held_out_rows() -> None:
    families = ["copy", "sort", "arithmetic"]
    held_out = held_out_rows(families)
    train = verifiable_conversations(families, 300, seed=0, held_out=held_out)
    for family in families:
        asked = {conv[0]["content"] for conv in train[family]}
        assert len(train[family]) == 300 and len(asked) == 300
        assert not asked & {f"Q: {row['question']}\nA:" for row in held_out[family]}
    with pytest.raises(DataFormatError, match="unknown family 'spelling'"):
        verifiable_conversations(["spelling"], 5, 0, {})


def lora_pair() -> tuple[Decoder, Decoder]:
    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=32)
    base = Decoder(config)
    adapted = with_lora(Decoder(config), LoraSettings(r=4, alpha=8))
    state = adapted.state_dict()
    for key in state:
        if key.replace(".base_layer", "") in base.state_dict():
            state[key] = base.state_dict()[key.replace(".base_layer", "")]
        elif "lora_B" in key:
            state[key] = torch.randn_like(state[key]) * 0.1  # a trained adapter, not the zero init
    adapted.load_state_dict(state)
    return base, adapted.eval()


def test_merged_lora_weights_give_the_adapter_models_logits() -> None:
    base, adapted = lora_pair()
    idx = torch.randint(0, 300, (3, 16))
    with torch.no_grad():
        plain = merged(adapted)
        assert not any("lora" in name for name in plain.state_dict())
        assert (adapted(idx) - base.eval()(idx)).abs().max() > 1e-2  # the adapter changes the model
        torch.testing.assert_close(plain(idx), adapted(idx), rtol=1e-5, atol=1e-5)


def test_adapter_saves_and_loads(tmp_path) -> None:
    base, adapted = lora_pair()
    folder = save_adapter(adapted, LoraSettings(r=4, alpha=8), tmp_path / "adapter")
    reloaded = load_adapter(Decoder(base.config), folder)
    reloaded.load_state_dict({**reloaded.state_dict(), **{k: v for k, v in adapted.state_dict().items() if "lora" not in k}})
    idx = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(idx), adapted(idx))
    assert trained_parameters(reloaded) == trained_parameters(adapted) == 2 * (4 * (32 + 96) + 4 * (32 + 32) + 4 * (32 + 128) + 4 * (128 + 32))


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """A shrunk base (2 layers, 32 wide, 12 steps), then 8 SFT steps of both arms, scored on 4 rows per family."""
    root = tmp_path_factory.mktemp("sft")
    corpus = write_corpus(root / "corpus")
    stage = [f"pretrain.{o}".format(corpus=corpus, cache=root / "cache") for o in (*CORPUS, *SHRINK)]
    stage += ["pretrain.model.block_size=64"]
    overrides = [*stage, "data.per_family=40", "data.batch_size=8", "train.max_steps=8", "train.val_every=4",
                 "train.val_batches=2", "train.checkpoint_every=8", "eval.limit=4", "eval.batch_size=8",
                 "eval.tasks=[repro_verifiable_copy,repro_verifiable_sort]", "data.families=[copy,sort]"]
    return run(RunSpec("sft", "tiny", overrides, seed=0), out=root / "runs")


def test_run_scores_base_full_and_lora_and_reports_claims(sft_run) -> None:
    record = json.loads((sft_run / "metrics.json").read_text())
    metrics = record["metrics"]
    for family in ("copy", "sort"):
        for arm in ("base", "full", "lora"):
            assert 0 <= metrics[f"exact_match/{family}/{arm}"] <= 1
    assert metrics["lora/trained_params"] < metrics["full/trained_params"]
    assert metrics["data/supervised_share"] < 0.5
    claims = {c["claim"]: c for c in record["claims"]}
    assert len(claims) == 3 and all(c["verdict"] in ("reproduced", "not reproduced") for c in claims.values())
    history = record["history"]
    assert history["train/loss"][0][1] == pytest.approx(history["train/loss_lora"][0][1], rel=1e-6)  # same base, B = 0
    assert "exact_match/copy/lora" in (sft_run / "report.md").read_text()
    assert json.loads((sft_run / "stages.json").read_text())["pretrain"].endswith("final.ckpt")


def test_fine_tuned_model_is_prompted_through_its_chat_template(sft_run) -> None:
    from datamodules.verifiable import prompt
    from repro.evaluate import evaluate

    results = evaluate(sft_run, ["repro_verifiable_copy"], limit=2, batch_size=2, device="cpu", arm="lora")
    sample = results["samples"]["repro_verifiable_copy"][0]
    context = sample["arguments"][0][0] if isinstance(sample["arguments"][0], (list, tuple)) else sample["arguments"]["gen_args_0"]["arg_0"]
    assert context == render([{"role": "user", "content": prompt(sample["doc"]["question"])}], add_generation_prompt=True)
    assert results["config"]["model_args"]["arm"] == "lora" if isinstance(results["config"]["model_args"], dict) else "arm=lora" in results["config"]["model_args"]


def test_init_starts_from_a_given_base_instead_of_training_one(sft_run, tmp_path, capsys) -> None:
    from repro.run import main

    base_ckpt = json.loads((sft_run / "stages.json").read_text())["pretrain"]
    base_run = Path(base_ckpt).parent.parent
    out = tmp_path / "runs"
    args = ["--technique", "sft", "--init", str(base_run), "--out", str(out)]
    for item in ["data.per_family=20", "data.batch_size=8", "train.max_steps=2", "train.val_every=2", "train.val_batches=1",
                 "train.checkpoint_every=2", "eval.enabled=false"]:
        args += ["--set", item]
    assert main(args) == 0
    run_dir = next((out / "sft").iterdir())
    assert json.loads((run_dir / "stages.json").read_text()) == {"pretrain": base_ckpt}
    assert not (out / "pretrain").exists()  # no stage trained
    assert "--init" in (run_dir / "report.md").read_text()
    capsys.readouterr()
    assert main(["--technique", "sft", "--init", str(sft_run), "--out", str(out)]) == 2
    assert "starts from a pretrain run; this one is sft" in capsys.readouterr().err
    assert main(["--technique", "pretrain", "--init", str(base_run), "--out", str(out)]) == 2


def test_claims_read_the_families_trained_on_from_the_config() -> None:
    from repro.config import build_config
    from repro.techniques.sft import SFTConfig, claims

    config = build_config(SFTConfig, {"data": {"families": ["copy", "sort"]},
                                      "eval": {"tasks": ["repro_verifiable_copy", "repro_verifiable_sort", "repro_verifiable_reverse"]}})
    scores = {("copy", "full"): 0.5, ("sort", "full"): 0.85, ("reverse", "full"): 1.0,
              ("copy", "lora"): 0.5, ("sort", "lora"): 0.6, ("reverse", "lora"): 1.0, ("sort", "base"): 0.0}
    metrics = {f"exact_match/{family}/{arm}": v for (family, arm), v in scores.items()}
    taught, near, fewer = claims(config, {**metrics, "full/trained_params": 1000, "lora/trained_params": 50})
    # reverse was evaluated but not trained on: the easiest family taught is sort, and LoRA's mean is over copy and sort
    assert (taught.measured, taught.verdict) == (0.85, "reproduced") and "(sort)" in taught.metric
    assert (near.measured, near.limit, near.verdict) == (0.55, pytest.approx(0.9 * 0.675), "not reproduced")
    assert fewer.verdict == "reproduced"
