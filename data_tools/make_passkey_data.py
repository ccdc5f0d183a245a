"""Write a passkey-retrieval grid (context lengths x depths) as jsonl token ids.

Each line: context_tokens, depth, passkey, prompt_ids, answer_ids, needle_token_offset,
actual_depth (and prompt/answer text with --include-text). The prompt plus answer never exceeds
context_tokens.

Example:
    python data_tools/make_passkey_data.py --tokenizer-model out/tok.model --output passkey.jsonl \\
        --context-lengths 1024 4096 16384 --depths 0 0.25 0.5 0.75 1 --samples-per-cell 5
"""

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from s2megatron.data.passkey import write_passkey_jsonl  # noqa: E402
from s2megatron.data.tokenizer import S2Tokenizer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece .model file")
    p.add_argument("--output", required=True, help="output .jsonl")
    p.add_argument("--context-lengths", type=int, nargs="+", required=True,
                   help="token budgets (prompt + answer)")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="needle depths in [0, 1] (default: 0 0.25 0.5 0.75 1)")
    p.add_argument("--samples-per-cell", type=int, default=5, help="samples per (length, depth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--include-text", action="store_true", help="also store prompt/answer text")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    n = write_passkey_jsonl(
        args.output, S2Tokenizer(args.tokenizer_model), args.context_lengths, args.depths,
        args.samples_per_cell, args.seed, include_text=args.include_text,
    )
    print(f"{args.output}: {n} samples")


if __name__ == "__main__":
    main()
