"""`--technique tokenizers`: subword tokenizers written here, against the libraries they reproduce.

Trains no model: it trains tokenizers. Byte-level BPE (Sennrich et al. 2016; GPT-2), WordPiece
(Schuster & Nakajima 2012; BERT) and Unigram (Kudo 2018, SentencePiece's EM with Viterbi and
pruning) from `datamodules/subword/`, and their library counterparts (`tokenizers`, `sentencepiece`),
each trained on the same sample of the corpus at the same vocabulary size and measured on held-out
documents (`measurement/tokenizers.py`): training time, bytes per token, tokens per word, encode
speed, vocabulary overlap. The claims are computed from that run: our BPE's merges and ids are the
library's, BPE and Unigram round-trip every held-out text, and our WordPiece and Unigram compress
about as well as the libraries'.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from datamodules.pretrain import cache_root
from datamodules.sources import read_source
from measurement.tokenizers import compare, split, table
from reports.claims import ClaimResult, check_above, not_measured
from reports.plots import grouped_bars
from repro.registry import Finished, Measured, Step, Technique, register

SOURCE = "Sennrich et al. 2016 (BPE); Schuster & Nakajima 2012, BERT (WordPiece); Kudo 2018 (Unigram, SentencePiece)"
COMPRESSION_SHARE = 0.9  # "about as well": at least 90% of the library's bytes per token


@dataclass
class CorpusSample:
    """The `corpus.` section: where the texts come from and how much of them."""

    source: str = "python-docs"  # as `data.source` of a pretraining preset
    text_field: str = "text"
    max_bytes: int = 1_000_000  # UTF-8 bytes sampled (`datamodules.tokenizer.sample`): every 10th text held out
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.max_bytes < 1000:
            raise ValueError(f"corpus.max_bytes={self.max_bytes}: sample at least 1000 bytes")


@dataclass
class TokenizersConfig:
    corpus: CorpusSample = field(default_factory=CorpusSample)
    vocab_size: int = 2048

    def __post_init__(self) -> None:
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size={self.vocab_size}: at least 300 (256 bytes, the special tokens and some merges)")


def _compare(finished: Finished) -> Measured:
    """Train every tokenizer on the same sample and measure each on the held-out texts (tokenizers.json); our BPE's
    merges and ids against the library's, and whether BPE and Unigram round-trip every held-out text."""
    config = finished.config
    c = config.corpus
    documents, note = read_source(c.source, c.text_field, "train", cache_root(c))
    train, test = split([d.text for d in documents], c.max_bytes)
    print(f"tokenizers: {len(train)} training texts, {len(test)} held out, vocabulary {config.vocab_size}", flush=True)
    models: dict[tuple[str, str], Any] = {}
    records = compare(train, test, config.vocab_size, models)
    (finished.run_dir / "tokenizers.json").write_text(json.dumps(records, indent=2))
    metrics = {f"{r['library']}/{r['algorithm']}/{k}": r[k] for r in records
               for k in ("train_s", "bytes_per_token", "tokens_per_word", "encode_mb_s", "overlap")}
    metrics |= {"corpus/train_texts": len(train), "corpus/test_texts": len(test),
                "corpus/train_bytes": sum(len(t.encode()) for t in train), "corpus/test_bytes": sum(len(t.encode()) for t in test)}

    # parity: the same merges in the same order and the same ids on every held-out text
    ours, theirs = models["ours", "bpe"], models["tokenizers", "bpe"]
    library_merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                      for m in json.loads(theirs.to_str())["model"]["merges"]]
    metrics |= {"bpe/merges": len(library_merges), "bpe/same_merges": ours.merges() == library_merges,
                "bpe/same_ids_on_test": all(ours.encode(t) == theirs.encode(t).ids for t in test)}
    unigram = models["ours", "unigram"]
    metrics |= {"bpe/lossless_on_test": all(ours.decode(ours.encode(t)) == t for t in test),
                "unigram/lossless_on_test": all(unigram.decode(unigram.encode(t)) == t for t in test)}
    notes = [f"Corpus: {c.source} ({note}); a deterministic sample of {c.max_bytes:,} bytes (`datamodules.tokenizer.sample`), "
             "every 10th text held out. Times are one run's wall seconds (`time.perf_counter`); encode speed is one text at "
             "a time. Overlap: Jaccard index of the learned token strings (special tokens and byte pieces left out) with the "
             "counterpart named. WordPiece: ours scores pairs by the unigram likelihood gain; `tokenizers`' trains as BPE "
             "with the ## prefix (see datamodules/subword/wordpiece.py)."]
    return Measured(metrics, notes=notes)


def _report(finished: Finished) -> Measured:
    """Bytes per token of every tokenizer (compression.png) and the table side by side, from tokenizers.json."""
    records = json.loads((finished.run_dir / "tokenizers.json").read_text())
    bars: dict[str, dict[str, float]] = {}
    for r in records:
        bars.setdefault(r["library"], {})[r["algorithm"]] = r["bytes_per_token"]
    chart = grouped_bars(bars, "UTF-8 bytes per token (held out)", f"Compression at vocabulary {finished.config.vocab_size}")
    (finished.run_dir / "compression.png").write_bytes(chart)
    return Measured(sections={"Tokenizers side by side": ["![bytes per token](compression.png)", "", *table(records)]})


def claims(config: TokenizersConfig, metrics: Mapping[str, Any]) -> list[ClaimResult]:
    """BPE's parity with `tokenizers`, the round trip of BPE and Unigram, and WordPiece's and Unigram's compression."""
    compression = [check_above(
        claim=f"Our {algorithm} compresses about as well as the {library} library's", source=SOURCE,
        metric=f"UTF-8 bytes per token on the held-out texts, ours {algorithm}", measured=metrics.get(f"ours/{algorithm}/bytes_per_token"),
        bound=metrics.get(f"{library}/{algorithm}/bytes_per_token"), factor=COMPRESSION_SHARE, paper="the same algorithm",
        bound_name=f"the {library} library's bytes per token") for algorithm, library in (("wordpiece", "tokenizers"), ("unigram", "sentencepiece"))]
    return [_parity(metrics), _round_trip(metrics), *compression]


def _parity(metrics: Mapping[str, Any]) -> ClaimResult:
    claim, paper = "Our byte-level BPE learns the library's merges and gives its ids", "the reference algorithm, tie-breaking included"
    merges, ids, tests = (metrics.get(k) for k in ("bpe/same_merges", "bpe/same_ids_on_test", "corpus/test_texts"))
    if merges is None or ids is None:
        return not_measured(claim, SOURCE, "merges and ids on the held-out texts vs `tokenizers`' BpeTrainer", paper,
                            "no tokenizers were trained")
    return ClaimResult(claim=claim, source=SOURCE,
                       metric=f"merges (of {metrics.get('bpe/merges')}) and ids on {tests} held-out texts vs `tokenizers`' BpeTrainer",
                       measured=float(merges and ids), paper=paper, threshold="identical merges and ids",
                       verdict="reproduced" if merges and ids else "not reproduced",
                       detail=f"merges identical: {merges}; ids identical on every held-out text: {ids}")


def _round_trip(metrics: Mapping[str, Any]) -> ClaimResult:
    claim, paper = "Byte-level subwords give an open vocabulary at a fixed size: any text round-trips", "no out-of-vocabulary words"
    lossless = {k: metrics.get(f"{k}/lossless_on_test") for k in ("bpe", "unigram")}
    if None in lossless.values():
        return not_measured(claim, SOURCE, "decode(encode(text)) == text on the held-out texts, BPE and Unigram (byte fallback)",
                            paper, "no tokenizers were trained")
    return ClaimResult(claim=claim, source=SOURCE,
                       metric=f"decode(encode(text)) == text on {metrics.get('corpus/test_texts')} held-out texts, BPE and Unigram (byte fallback)",
                       measured=float(all(lossless.values())), paper=paper, threshold="every text, both",
                       verdict="reproduced" if all(lossless.values()) else "not reproduced",
                       detail=", ".join(f"{k}: {'lossless' if v else 'lossy'}" for k, v in lossless.items()))


register(
    Technique(
        name="tokenizers",
        summary="subword tokenizers from scratch (byte-level BPE, WordPiece, Unigram) against tokenizers and sentencepiece",
        config=TokenizersConfig,
        steps=(Step("compare", _compare), Step("report", _report)),
        claims=claims,
    )
)
