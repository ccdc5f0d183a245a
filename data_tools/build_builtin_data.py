"""Build (or find in the cache) the built-in data: stdlib corpus, tokenizer, indexed dataset.

Training builds it on first use anyway; run this to pre-fill a cache, e.g. before a multi-node
job. Prints the dataset prefix and the tokenizer path.

Example:
    python data_tools/build_builtin_data.py --cache-dir /shared/s2m_cache --vocab-size 4096
"""

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from s2megatron.data.builtin import default_cache_dir, ensure_builtin_data  # noqa: E402
from s2megatron.data.corpus import DEFAULT_MAX_BYTES  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cache-dir", default=None,
                   help=f"cache root (default: $S2M_CACHE or {default_cache_dir()})")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--corpus-bytes", type=int, default=DEFAULT_MAX_BYTES,
                   help="stdlib text to use, in bytes")
    p.add_argument("--workers", type=int, default=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    data = ensure_builtin_data(
        args.cache_dir, args.vocab_size, corpus_bytes=args.corpus_bytes, workers=args.workers
    )
    print(f"data_prefix={data.data_prefix}")
    print(f"tokenizer_model={data.tokenizer_model}")
    print(f"num_tokens={data.num_tokens} num_documents={data.num_documents}")


if __name__ == "__main__":
    main()
