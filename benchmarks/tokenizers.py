"""Our subword tokenizers (`datamodules.subword`) against the libraries they reproduce.

    python -m benchmarks.tokenizers                         # 2 MB of the Python docs corpus, vocabulary 4096
    python -m benchmarks.tokenizers --source DIR --max-bytes 500000 --vocab-size 1000

Prints one row per tokenizer: training seconds, bytes per token, tokens per word, encode MB/s and the vocabulary
overlap (Jaccard) with its counterpart, trained on the same texts at the same vocabulary size and measured on
held-out ones (`measurement.tokenizers`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from datamodules.sources import python_docs, read_local
from measurement.tokenizers import compare, split, table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="a folder of .txt/.md/.rst files (default: the Python docs corpus)")
    parser.add_argument("--max-bytes", type=int, default=2_000_000, help="UTF-8 bytes of text to use, train + test")
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args(argv)
    documents = read_local(args.source) if args.source else python_docs()[0]
    train_texts, test_texts = split([d.text for d in documents], args.max_bytes)
    size = sum(len(t.encode("utf-8")) for t in train_texts) / 1e6, sum(len(t.encode("utf-8")) for t in test_texts) / 1e6
    print(f"{len(train_texts)} training texts ({size[0]:.2f} MB), {len(test_texts)} test texts ({size[1]:.2f} MB), "
          f"vocabulary {args.vocab_size}")
    print("\n".join(table(compare(train_texts, test_texts, args.vocab_size))))


if __name__ == "__main__":
    main()
