"""Train a SentencePiece tokenizer (byte fallback, identity normalization) on .txt/.jsonl files.

Example:
    python data_tools/train_tokenizer.py --input corpus.jsonl --model-prefix out/tok \\
        --vocab-size 8192
"""

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from s2megatron.data.tokenizer import S2Tokenizer, train_sentencepiece  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help=".txt (one document per file) and/or .jsonl (one document per line) files")
    p.add_argument("--model-prefix", required=True, help="writes <prefix>.model and <prefix>.vocab")
    p.add_argument("--vocab-size", type=int, required=True, help="number of pieces (>= 300)")
    p.add_argument("--text-key", default="text",
                   help="jsonl field holding the text (default: text)")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--max-sentence-length", type=int, default=4192,
                   help="max training line length in bytes; longer lines are cut")
    p.add_argument("--num-threads", type=int, default=None, help="default: all cores")
    p.add_argument("--input-sentence-size", type=int, default=0,
                   help="train on a sample of this many lines (0: all)")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    path = train_sentencepiece(
        args.input, args.model_prefix, args.vocab_size,
        text_key=args.text_key, model_type=args.model_type,
        max_sentence_length=args.max_sentence_length, num_threads=args.num_threads,
        input_sentence_size=args.input_sentence_size, seed=args.seed,
    )
    tok = S2Tokenizer(path)
    print(f"{path}: vocab_size={tok.vocab_size} eod={tok.eod} pad={tok.pad} bos={tok.bos}")


if __name__ == "__main__":
    main()
