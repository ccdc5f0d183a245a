"""Tokenize .txt/.jsonl documents into a Megatron indexed dataset (<prefix>.bin / <prefix>.idx).

Every document is followed by the tokenizer's eod id (unless --no-eod). The output is written
under a temporary name and renamed into place when complete.

Example:
    python data_tools/preprocess_data.py --input corpus.jsonl --tokenizer-model out/tok.model \\
        --output-prefix out/corpus_text_document --workers 4
"""

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from s2megatron.data.indexed import build_indexed_dataset, indexed_dataset_stats  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help=".txt (one document per file) and/or .jsonl (one document per line) files")
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece .model file")
    p.add_argument("--output-prefix", required=True, help="dataset path prefix (no suffix)")
    p.add_argument("--text-key", default="text",
                   help="jsonl field holding the text (default: text)")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizer processes (default: cores, at most 8)")
    p.add_argument("--no-eod", action="store_true", help="do not append eod after each document")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    prefix = build_indexed_dataset(
        args.input, args.tokenizer_model, args.output_prefix,
        text_key=args.text_key, workers=args.workers,
        append_eod=not args.no_eod, show_progress=not args.quiet,
    )
    num_docs, num_tokens = indexed_dataset_stats(prefix)
    print(f"{prefix}: {num_docs} documents, {num_tokens} tokens")


if __name__ == "__main__":
    main()
