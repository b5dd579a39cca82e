"""Constitutional AI pieces: the constitution and its checkers, red-team prompts, the critique-revise loop's prompts,
AI feedback (its answer, its invariance to the options' order), the log-prob scorers against a direct computation,
and SL-CAI rows and RL-CAI pairs read by the suite's own SFT and preference data code."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from datamodules import cai
from datamodules.chat import END, TAGS, add_chat_tokens, encode
from datamodules.constitution import ANY, CONSTITUTION, CHECKERS, ConstitutionError, load_constitution, violation_rate, violations
from datamodules.preference import PreferenceDataConfig, PreferenceDataModule, read_pairs
from datamodules.red_team import KINDS, ORDINARY, helpfulness, red_team_prompts, split
from datamodules.sft import SFTDataConfig, SFTDataModule
from datamodules.tokenizer import train_bpe
from modules.nn import Decoder, DecoderConfig
from modules.nn.decoder import IGNORE

PRINCIPLES = load_constitution()
BY_NAME = {p.name: p for p in PRINCIPLES}
TEXT = "Human: repeat the words. Assistant: apple river, fine thanks. The cat sat on the mat. Which response is better? (A) (B) "


@pytest.fixture(scope="module")
def chat_tokenizer() -> Tokenizer:
    tokenizer = train_bpe([TEXT * 40], 300)
    add_chat_tokens(tokenizer)
    return tokenizer


def tiny_decoder(vocab_size: int, block_size: int = 64) -> Decoder:
    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32, pad_vocab_to=16)
    return Decoder(config).eval()


# checker -> (a response that violates it, a clean one that comes close)
EXAMPLES = {
    "profanity": ("that is a stupid question", "hello, that shell is fine"),
    "personal_data": ("write to anna.smith@example.com or call 555-123-4567", "sort ascending: 7 19 42 55"),
    "shouting": ("PLEASE STOP doing that", "the USA is large"),
    "repetition": ("the cat the cat the cat sat", "the cat sat on the mat, the cat"),
    "length": (" ".join(["word"] * 31), " ".join(["word"] * 30)),
    "dangerous": ("first mix the powder then heat the napalm", "I can't help you make napalm."),
    "urls": ("see https://www.example.com/page or docs.python.org", "email anna@example.com, not a link"),
}


def test_constitution_has_the_papers_texts_and_checkers() -> None:
    assert 6 <= len(PRINCIPLES) <= 8 and len(BY_NAME) == len(PRINCIPLES)
    for p in PRINCIPLES:
        assert p.critique_request.startswith("Identify specific ways in which the assistant's last response")
        assert p.revision_request.startswith("Please rewrite the assistant response")
        assert p.choice_question.startswith("Which of these assistant responses") and "?" in p.choice_question
    assert {p.checker for p in PRINCIPLES if p.checker} == set(CHECKERS) == set(EXAMPLES) == set(cai.FIXERS)
    assert BY_NAME["honesty"].checker is None and BY_NAME["honesty"].violates("anything") is None


@pytest.mark.parametrize("checker", sorted(EXAMPLES))
def test_each_checker_flags_a_violation_and_passes_a_clean_response(checker: str) -> None:
    principle = next(p for p in PRINCIPLES if p.checker == checker)
    bad, good = EXAMPLES[checker]
    assert principle.violates(bad) is True
    assert principle.violates(good) is False


def test_violations_and_rates_cover_the_checkable_principles() -> None:
    verdicts = violations("CALL ME NOW at 555-123-4567", PRINCIPLES)
    assert "honesty" not in verdicts and len(verdicts) == 7
    assert {k for k, v in verdicts.items() if v} == {"privacy", "calm_tone"}
    rates = violation_rate(["fine", "you idiot", "idiot idiot idiot"], PRINCIPLES)
    assert rates["harmless_language"] == pytest.approx(2 / 3) and rates["no_repetition"] == pytest.approx(1 / 3)
    assert rates[ANY] == pytest.approx(2 / 3) and rates["privacy"] == 0
    with pytest.raises(ValueError):
        violation_rate([], PRINCIPLES)


GOOD = {"name": "ok", "critique_request": "c", "revision_request": "r", "choice_question": "q?", "checker": None}


@pytest.mark.parametrize("second, message", [
    ({**GOOD, "name": "loud", "checker": "yelling"}, r"principle 2 \('loud'\): unknown checker 'yelling'"),
    ({k: v for k, v in GOOD.items() if k != "revision_request"} | {"name": "x"}, r"principle 2 \('x'\): missing or empty field 'revision_request'"),
    ({k: v for k, v in GOOD.items() if k != "checker"} | {"name": "x"}, r"principle 2 \('x'\): missing field 'checker'"),
    ({**GOOD, "name": "x", "checker": "length", "checker_args": {"max_lines": 3}}, r"principle 2 \('x'\): checker_args .* do not fit"),
    ({**GOOD, "name": "x", "critque_request": "typo"}, r"principle 2 \('x'\): unknown field\(s\) \['critque_request'\]"),
    (GOOD, r"principle 2 \('ok'\): the name is used twice"),
])
def test_loader_errors_name_the_file_and_the_principle(tmp_path: Path, second: dict, message: str) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"principles": [GOOD, second]}))
    with pytest.raises(ConstitutionError, match=re.escape(f"{path}, ") + message):
        load_constitution(path)


def test_loader_reads_json_and_rejects_a_file_without_principles(tmp_path: Path) -> None:
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"principles": [{**GOOD, "checker": "length", "checker_args": {"max_words": 2}}]}))
    (only,) = load_constitution(path)
    assert only.violates("one two three") and not only.violates("one two")
    path.write_text("rules: []")
    with pytest.raises(ConstitutionError, match="one.json: expected a mapping with a non-empty list `principles`"):
        load_constitution(path)
    assert load_constitution(CONSTITUTION) == PRINCIPLES


def test_red_team_prompts_are_seeded_split_and_each_payload_violates_its_principle() -> None:
    prompts = red_team_prompts(80, seed=3)
    assert prompts == red_team_prompts(80, seed=3) and prompts != red_team_prompts(80, seed=4)
    assert {p.kind for p in prompts} == set(KINDS) and len({p.text for p in prompts}) == 80
    for p in prompts:
        assert p.text.startswith("Q: ") and p.text.endswith("\nA:")
        if p.kind == ORDINARY:
            assert not any(violations(p.text, PRINCIPLES).values())
        else:  # a model that repeats or reverses what it was handed violates the prompt's principle
            assert p.payload in p.text
            assert BY_NAME[p.kind].violates(p.payload) and BY_NAME[p.kind].violates(" ".join(p.payload.split()[::-1]))
            # the oracle's rule-based fix leaves nothing for any checker
            assert not any(violations(cai.rule_based_revision(p.payload, PRINCIPLES), PRINCIPLES).values())
    train, held_out = split(40, 16, seed=3)
    assert not {p.text for p in train} & {p.text for p in held_out}
    assert split(60, 16, seed=3)[1] == held_out  # more training prompts never move the held-out ones


def test_helpfulness_scores_ordinary_answers_exactly_and_counts_short_responses() -> None:
    prompts = red_team_prompts(16, seed=5)
    ordinary = [p for p in prompts if p.kind == ORDINARY]
    assert ordinary and all(p.answer for p in ordinary) and not any(p.answer for p in prompts if p.kind != ORDINARY)
    right = [f" {p.answer}\n" if p.kind == ORDINARY else "no" for p in prompts]
    h = helpfulness(right, prompts)
    assert h["task_accuracy"] == 1.0
    assert h["one_word_share"] == sum(p.kind != ORDINARY or len(p.answer.split()) <= 1 for p in prompts) / len(prompts)
    wrong = ["no"] * len(prompts)
    h = helpfulness(wrong, prompts)
    assert h == {"task_accuracy": 0.0, "mean_words": 1.0, "one_word_share": 1.0}
    red_only = [p for p in prompts if p.kind != ORDINARY]
    assert helpfulness(["a b"] * len(red_only), red_only) == {"task_accuracy": None, "mean_words": 2.0, "one_word_share": 0.0}
    with pytest.raises(ValueError, match="responses for"):
        helpfulness(["x"], prompts)


def fake_generator(calls: list[str]):
    def generate_fn(text: str) -> str:
        calls.append(text)
        if text.endswith("Critique:"):  # the model runs on into the next section: cut at its header
            return f" critique {len(calls)}\n\nRevision Request: made up"
        return f" revised {len(calls)} \n\nCritique Request: made up"
    return generate_fn


def test_critique_revise_writes_the_papers_prompts_and_records_each_step() -> None:
    calls: list[str] = []
    steps = cai.critique_revise(fake_generator(calls), "Q: Repeat the words: you idiot\nA:", "you idiot", PRINCIPLES,
                                rounds=2, rng=random.Random(1))
    drawn = random.Random(1)
    first, second = (BY_NAME[drawn.choice(PRINCIPLES).name] for _ in range(2))
    assert [s.principle for s in steps] == [first.name, second.name] and len(calls) == 4
    ask = (f"Human: Q: Repeat the words: you idiot\nA:\n\nAssistant: you idiot\n\n"
           f"Critique Request: {first.critique_request}\n\nCritique:")
    assert steps[0].critique_prompt == calls[0] == ask
    assert steps[0].critique == "critique 1"
    assert steps[0].revision_prompt == calls[1] == f"{ask} critique 1\n\nRevision Request: {first.revision_request}\n\nRevision:"
    assert steps[0].revision == "revised 2"
    # the second round critiques the first revision under its own principle
    assert steps[1].response == "revised 2" and f"Assistant: revised 2\n\nCritique Request: {second.critique_request}" in calls[2]
    assert steps[1].revision == "revised 4"


def option_scorer(good: str, bias_a: float = 0.0):
    """log p(letter | context): 0 for the letter of the option containing `good`, -3 for the other; plus `bias_a` on A."""
    def score_fn(context: str, continuation: str) -> float:
        assert context.endswith("The answer is: (") and continuation in ("A", "B")
        option = context.split(f"({continuation}) ")[1].split("\n")[0]
        return (0.0 if good in option else -3.0) + (bias_a if continuation == "A" else 0.0)
    return score_fn


def test_ai_feedback_prefers_what_the_scores_favour_and_ignores_the_options_order() -> None:
    principle = BY_NAME["harmless_language"]
    p_a, p_b = cai.ai_feedback(option_scorer("kind"), "say hi", "a kind reply", "you idiot", principle)
    assert p_a + p_b == pytest.approx(1) and p_a == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item())
    assert cai.ai_feedback(option_scorer("kind"), "say hi", "you idiot", "a kind reply", principle) == pytest.approx((p_b, p_a))
    # a judge that always answers A prefers neither response once both orders are averaged
    assert cai.ai_feedback(option_scorer("nothing", bias_a=5.0), "say hi", "x", "y", principle) == pytest.approx((0.5, 0.5))
    biased = cai.ai_feedback(option_scorer("kind", bias_a=2.0), "say hi", "you idiot", "a kind reply", principle)
    assert biased[1] > 0.5 and biased == pytest.approx(cai.ai_feedback(option_scorer("kind", bias_a=2.0), "say hi", "a kind reply",
                                                                       "you idiot", principle)[::-1])
    text = cai.feedback_prompt("say hi", "one", "two", principle)
    assert text == ("Consider the following conversation between a human and an assistant:\nHuman: say hi\n"
                    f"{principle.choice_question}\nOptions:\n(A) one\n(B) two\nThe answer is: (")


@torch.no_grad()
def chain_rule_logprob(model: Decoder, context: list[int], continuation: list[int]) -> float:
    """The reference: one forward pass per continuation token over the whole prefix, log-softmax of its last position."""
    total, seq = 0.0, list(context)
    for token in continuation:
        logits = model(torch.tensor([seq]))[0, -1, : model.config.vocab_size]
        total += float(torch.log_softmax(logits.double(), -1)[token])
        seq.append(token)
    return total


def test_decoder_logprob_equals_a_direct_log_softmax(chat_tokenizer: Tokenizer) -> None:
    model = tiny_decoder(chat_tokenizer.get_vocab_size(), block_size=32)
    ids = lambda text: chat_tokenizer.encode(text).ids
    plain = cai.decoder_logprob(model, chat_tokenizer)
    assert plain("The cat sat", " on the mat") == pytest.approx(chain_rule_logprob(model, ids("The cat sat"), ids(" on the mat")), abs=1e-4)
    chat = cai.decoder_logprob(model, chat_tokenizer, chat=True)
    context = encode(chat_tokenizer, [{"role": "user", "content": "Which?"}])[0] + [chat_tokenizer.token_to_id(TAGS["assistant"])]
    assert chat("Which?", "A") == pytest.approx(chain_rule_logprob(model, context, ids("A")), abs=1e-4)
    long = TEXT * 3  # longer than the context: cut from the left to the last block_size tokens read
    kept = (ids(long) + ids("B"))[-33:]
    assert plain(long, "B") == pytest.approx(chain_rule_logprob(model, kept[:-1], kept[-1:]), abs=1e-4)


def test_decoder_generator_answers_as_a_chat_turn_and_cuts_long_prompts(chat_tokenizer: Tokenizer) -> None:
    from modules.decoding.generation import generate

    model = tiny_decoder(chat_tokenizer.get_vocab_size(), block_size=32)
    end = chat_tokenizer.token_to_id(END)
    generate_many = cai.decoder_generator(model, chat_tokenizer, max_new_tokens=6)
    out = generate_many(["hello", TEXT * 3])
    prompt = encode(chat_tokenizer, [{"role": "user", "content": "hello"}])[0] + [chat_tokenizer.token_to_id(TAGS["assistant"])]
    expected = [t for t in generate(model, [prompt], 6, eos_id=end)[0] if t != end]
    assert len(out) == 2 and out[0] == chat_tokenizer.decode(expected)
    with pytest.raises(ValueError, match="no room"):
        cai.decoder_generator(model, chat_tokenizer, max_new_tokens=32)


def test_sl_rows_are_an_sft_source(tmp_path: Path, chat_tokenizer: Tokenizer) -> None:
    step = lambda revision: cai.CritiqueStep("privacy", "r", "c", revision, "cp", "rp")
    prompts = ["Q: Repeat the words: anna@example.com\nA:", "Q: say hi\nA:", "Q: nothing\nA:"]
    rows = cai.build_sl_data(prompts, [[step("first"), step("[email removed]")], [step("hi there")], [step("")]])
    assert [r["messages"][1]["content"] for r in rows] == ["[email removed]", "hi there"]  # the final revision; none: dropped
    path = tmp_path / "sl_cai.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    datamodule = SFTDataModule(SFTDataConfig(source=str(path), val_fraction=0.4, batch_size=1, cache_dir=str(tmp_path / "cache")),
                               chat_tokenizer)
    datamodule.setup()
    assert datamodule.stats["conversations"] == 2 and datamodule.stats["dropped_over_max_len"] == 0
    supervised = {chat_tokenizer.decode([t for t in labels if t != IGNORE])
                  for ids, labels in datamodule.train_set.rows + datamodule.val_set.rows}
    assert supervised == {"[email removed]", "hi there"}


def test_preference_pairs_are_labelled_by_feedback_and_read_by_the_dpo_data(tmp_path: Path, chat_tokenizer: Tokenizer) -> None:
    prompts = [f"Q: say {w}\nA:" for w in ("hi", "yes", "no", "ok", "same")]
    responses = [("a kind reply", "you idiot"), ("you idiot", "a kind word"), ("kind", "dumb"), ("crap", "kind"), ("x", "x")]
    principles = [BY_NAME["harmless_language"]]
    records = cai.build_preference_pairs(option_scorer("kind"), prompts, responses, principles, random.Random(0))
    assert len(records) == 4 and all("kind" in r["chosen"] and r["p_chosen"] > 0.9 for r in records)  # equal responses: no pair
    assert records[0] == {"prompt": prompts[0], "chosen": "a kind reply", "rejected": "you idiot",
                          "principle": "harmless_language", "p_chosen": records[0]["p_chosen"]}
    assert cai.checker_agreement(records, PRINCIPLES) == (1.0, 4)
    assert cai.build_preference_pairs(option_scorer("nothing"), prompts, responses, principles, min_margin=0.1) == []

    pairs = cai.to_pairs(records, chat_tokenizer)
    conversation = [{"role": "user", "content": prompts[0]}, {"role": "assistant", "content": "a kind reply"}]
    assert pairs[0].prompt + pairs[0].chosen == encode(chat_tokenizer, conversation)[0]  # what SFT trained on
    datamodule = PreferenceDataModule(PreferenceDataConfig(batch_size=2), pairs[:3], pairs[3:], pad_id=0)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["ids"].shape[0] == 4 and datamodule.stats["pairs_train"] == 3

    path = tmp_path / "rl_cai.jsonl"  # the records are also the `prompt`/`chosen`/`rejected` file layout
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    plain = train_bpe([TEXT * 40], 300)
    assert [(p.prompt, p.chosen) for p in read_pairs(str(path), plain, cache_dir=tmp_path / "cache")] == \
        [(p.prompt, p.chosen) for p in cai.to_pairs(records, plain)]


def test_hf_scorer_and_generator_on_a_tiny_local_model(tmp_path: Path, chat_tokenizer: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    plain = train_bpe([TEXT * 40], 300)
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=plain, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "tiny")
    wrapped.save_pretrained(tmp_path / "tiny")
    score = cai.hf_logprob(str(tmp_path / "tiny"), device="cpu")
    context, continuation = plain.encode("The cat sat").ids, plain.encode(" on the mat").ids
    expected, seq = 0.0, list(context)
    with torch.no_grad():
        for token in continuation:
            expected += float(torch.log_softmax(model(torch.tensor([seq])).logits[0, -1].double(), -1)[token])
            seq.append(token)
    assert score("The cat sat", " on the mat") == pytest.approx(expected, abs=1e-4)
    out = cai.hf_generator(str(tmp_path / "tiny"), max_new_tokens=4, device="cpu")(["The cat", "Which response is"])
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
