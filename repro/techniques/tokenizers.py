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
from pathlib import Path
from typing import Any

from datamodules.pretrain import cache_root
from datamodules.sources import read_source
from measurement.tokenizers import compare, split, table
from reports.claims import ClaimResult, check_above
from reports.plots import grouped_bars
from repro.registry import Findings, Technique, register

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


def measure(config: TokenizersConfig, seed: int, run_dir: Path) -> Findings:
    c = config.corpus
    documents, note = read_source(c.source, c.text_field, "train", cache_root(c))
    train, test = split([d.text for d in documents], c.max_bytes)
    print(f"tokenizers: {len(train)} training texts, {len(test)} held out, vocabulary {config.vocab_size}", flush=True)
    models: dict[tuple[str, str], Any] = {}
    records = compare(train, test, config.vocab_size, models)
    (run_dir / "tokenizers.json").write_text(json.dumps(records, indent=2))
    metrics = {f"{r['library']}/{r['algorithm']}/{k}": r[k] for r in records
               for k in ("train_s", "bytes_per_token", "tokens_per_word", "encode_mb_s", "overlap")}
    metrics |= {"corpus/train_texts": len(train), "corpus/test_texts": len(test),
                "corpus/train_bytes": sum(len(t.encode()) for t in train), "corpus/test_bytes": sum(len(t.encode()) for t in test)}

    # parity: the same merges in the same order and the same ids on every held-out text
    ours, theirs = models["ours", "bpe"], models["tokenizers", "bpe"]
    library_merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                      for m in json.loads(theirs.to_str())["model"]["merges"]]
    same_merges = ours.merges() == library_merges
    same_ids = all(ours.encode(t) == theirs.encode(t).ids for t in test)
    metrics |= {"bpe/merges": len(library_merges), "bpe/same_merges": same_merges, "bpe/same_ids_on_test": same_ids}
    unigram = models["ours", "unigram"]
    lossless = {"bpe": all(ours.decode(ours.encode(t)) == t for t in test),
                "unigram": all(unigram.decode(unigram.encode(t)) == t for t in test)}
    metrics |= {f"{k}/lossless_on_test": v for k, v in lossless.items()}

    by = {(r["library"], r["algorithm"]): r for r in records}
    claims = [
        ClaimResult(claim="Our byte-level BPE learns the library's merges and gives its ids", source=SOURCE,
                    metric=f"merges (of {len(library_merges)}) and ids on {len(test)} held-out texts vs `tokenizers`' BpeTrainer",
                    measured=float(same_merges and same_ids), paper="the reference algorithm, tie-breaking included",
                    threshold="identical merges and ids", verdict="reproduced" if same_merges and same_ids else "not reproduced",
                    detail=f"merges identical: {same_merges}; ids identical on every held-out text: {same_ids}"),
        ClaimResult(claim="Byte-level subwords give an open vocabulary at a fixed size: any text round-trips", source=SOURCE,
                    metric=f"decode(encode(text)) == text on {len(test)} held-out texts, BPE and Unigram (byte fallback)",
                    measured=float(all(lossless.values())), paper="no out-of-vocabulary words", threshold="every text, both",
                    verdict="reproduced" if all(lossless.values()) else "not reproduced",
                    detail=", ".join(f"{k}: {'lossless' if v else 'lossy'}" for k, v in lossless.items())),
    ]
    for algorithm, library in (("wordpiece", "tokenizers"), ("unigram", "sentencepiece")):
        claims.append(check_above(
            claim=f"Our {algorithm} compresses about as well as the {library} library's", source=SOURCE,
            metric=f"UTF-8 bytes per token on the held-out texts, ours {algorithm}", measured=by["ours", algorithm]["bytes_per_token"],
            bound=by[library, algorithm]["bytes_per_token"], factor=COMPRESSION_SHARE, paper="the same algorithm",
            bound_name=f"the {library} library's bytes per token"))

    bars: dict[str, dict[str, float]] = {}
    for (library, algorithm), r in by.items():
        bars.setdefault(library, {})[algorithm] = r["bytes_per_token"]
    (run_dir / "compression.png").write_bytes(grouped_bars(bars, "UTF-8 bytes per token (held out)",
                                                           f"Compression at vocabulary {config.vocab_size}"))
    sections = {"Tokenizers side by side": ["![bytes per token](compression.png)", "", *table(records)]}
    notes = [f"Corpus: {c.source} ({note}); a deterministic sample of {c.max_bytes:,} bytes (`datamodules.tokenizer.sample`), "
             "every 10th text held out. Times are one run's wall seconds (`time.perf_counter`); encode speed is one text at "
             "a time. Overlap: Jaccard index of the learned token strings (special tokens and byte pieces left out) with the "
             "counterpart named. WordPiece: ours scores pairs by the unigram likelihood gain; `tokenizers`' trains as BPE "
             "with the ## prefix (see datamodules/subword/wordpiece.py)."]
    return Findings(metrics=metrics, claims=claims, notes=notes, sections=sections)


register(
    Technique(
        name="tokenizers",
        summary="subword tokenizers from scratch (byte-level BPE, WordPiece, Unigram) against tokenizers and sentencepiece",
        config=TokenizersConfig,
        measure=measure,
    )
)
