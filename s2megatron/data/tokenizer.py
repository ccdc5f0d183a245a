"""SentencePiece tokenizer: training and the wrapper megatron-core's GPT datasets use.

Special ids (fixed for every model trained here):

=====  ======  ===========================================================
id     piece   use
=====  ======  ===========================================================
0      <unk>   never produced from text (byte fallback covers everything)
1      <s>     bos, available for prompts; not added by :meth:`tokenize`
2      </s>    eod: appended after every document in indexed datasets
3      <pad>   pad: megatron-core pads short samples with it and masks it
=====  ======  ===========================================================

The special pieces are control symbols: the literal strings ``"<s>"``, ``"</s>"``, ``"<pad>"``
in text are encoded as ordinary pieces, so no text can produce ids 1-3.

Normalization is the identity, whitespace is kept as-is (indentation, runs of spaces), no dummy
prefix is added, digits are split into single pieces and byte fallback is on: for any text
``detokenize(tokenize(text)) == text`` (the only exception is text containing the
meta-symbol U+2581 "▁", which decodes to a space).
"""

from __future__ import annotations

import io
import os
from collections import OrderedDict
from typing import List, Optional, Sequence, Union

import sentencepiece as spm

from s2megatron.data.textio import PathLike, iter_text_lines, normalize_input_paths
from s2megatron.fileio import file_sha256

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
_NUM_BYTE_PIECES = 256
MODEL_TYPES = ("bpe", "unigram")


def train_sentencepiece(
    input_paths: Union[PathLike, Sequence[PathLike]],
    model_prefix: PathLike,
    vocab_size: int,
    *,
    text_key: str = "text",
    model_type: str = "bpe",
    max_sentence_length: int = 4192,
    num_threads: Optional[int] = None,
    input_sentence_size: int = 0,
    seed: int = 1234,
    character_coverage: float = 0.9995,
) -> str:
    """Train a SentencePiece model on text documents and return the path of the ``.model`` file.

    Args:
        input_paths: ``.txt`` files (one document per file) and/or ``.jsonl`` files (one
            document per line, text in field ``text_key``); see :mod:`s2megatron.data.textio`.
        model_prefix: output prefix; writes ``<model_prefix>.model`` and ``<model_prefix>.vocab``.
            Both are written under a temporary name and renamed into place when complete.
            The model is a deterministic function of the inputs, the arguments and
            ``num_threads``.
        vocab_size: total number of pieces including the 4 special and 256 byte pieces;
            must be at least 300 (so that some merged pieces exist).
        model_type: ``"bpe"`` or ``"unigram"``.
        max_sentence_length: maximum training "sentence" (line) length in bytes; longer lines
            are cut, not dropped.
        num_threads: trainer threads (default: ``os.cpu_count()``).
        input_sentence_size: if > 0, train on a sample of that many lines (faster on big corpora).
        seed: random seed of the trainer (sampling), for reproducible models.
        character_coverage: fraction of characters covered by single-character pieces; the rest
            are encoded as bytes.

    Returns:
        str: path of the ``.model`` file.

    Raises:
        ValueError: bad ``vocab_size``/``model_type``/input paths, or a corpus too small for the
            requested ``vocab_size`` (the message carries SentencePiece's reason).
    """
    paths = normalize_input_paths(input_paths)
    min_vocab = _NUM_BYTE_PIECES + 4 + 40
    if not isinstance(vocab_size, int) or vocab_size < min_vocab:
        raise ValueError(f"vocab_size={vocab_size!r} is too small; need an int >= {min_vocab}")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not supported; valid: {MODEL_TYPES}")
    model_prefix = os.fspath(model_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    proto = io.BytesIO()  # in-memory model: no temporary prefix is recorded in it
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter_text_lines(paths, text_key, max_sentence_length),
            model_writer=proto,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            max_sentence_length=max_sentence_length,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=input_sentence_size > 0,
            num_threads=num_threads or os.cpu_count() or 1,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise ValueError(
            f"SentencePiece training failed for vocab_size={vocab_size} on {paths}: {err}"
        ) from err
    model_bytes = proto.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    vocab_text = "".join(
        f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size())
    )
    _atomic_write(model_prefix + ".vocab", vocab_text.encode("utf-8"))
    _atomic_write(model_prefix + ".model", model_bytes)  # last: its presence means complete
    return model_prefix + ".model"


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class S2Tokenizer:
    """A SentencePiece model with the attributes megatron-core's GPT datasets need.

    Attributes:
        vocab_size (int): number of pieces (ids are in ``[0, vocab_size)``).
        eod (int): end-of-document id (SentencePiece's eos, ``</s>``).
        eos (int): same as ``eod``.
        bos (int): beginning-of-sequence id (``<s>``), never added implicitly.
        pad (int): padding id (``<pad>``), distinct from ``eod``/``bos``/``unk``.
        unk (int): unknown id (unused in practice: byte fallback).
        unique_identifiers (OrderedDict): describes the tokenizer for megatron-core's dataset
            cache hashing; contains the model file's sha256, not its path, so moving the file
            keeps caches valid.

    Raises:
        ValueError: if the model file does not exist or lacks a distinct eos/pad id.
    """

    def __init__(self, model_path: PathLike) -> None:
        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise ValueError(f"tokenizer model {model_path!r} does not exist")
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        self.vocab_size = int(self._sp.get_piece_size())
        self.eod = int(self._sp.eos_id())
        self.bos = int(self._sp.bos_id())
        self.pad = int(self._sp.pad_id())
        self.unk = int(self._sp.unk_id())
        if self.eod < 0 or self.pad < 0 or self.pad == self.eod:
            raise ValueError(
                f"tokenizer {model_path!r} needs distinct eos and pad ids, got "
                f"eos={self.eod}, pad={self.pad}; train it with train_sentencepiece()"
            )
        self.sha256 = file_sha256(model_path)
        self.unique_identifiers = OrderedDict(
            [
                ("class", type(self).__name__),
                ("library", "sentencepiece"),
                ("model_sha256", self.sha256),
                ("vocab_size", self.vocab_size),
                ("eod", self.eod),
                ("pad", self.pad),
            ]
        )

    @property
    def eos(self) -> int:
        return self.eod

    def tokenize(self, text: str) -> List[int]:
        """Encode ``text`` to a list of ids (no bos/eos added)."""
        return self._sp.encode(text, out_type=int)

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Encode several texts at once (one C++ call)."""
        return self._sp.encode(list(texts), out_type=int)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Decode ids to text; special ids (bos/eod/pad/unk) decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def is_special(self, token_id: int) -> bool:
        """True for the control/unknown ids (unk, bos, eod, pad)."""
        return bool(self._sp.is_control(int(token_id)) or self._sp.is_unknown(int(token_id)))

    # SentencePieceProcessor objects are reloaded from the file in worker processes.
    def __getstate__(self):
        return {"model_path": self.model_path}

    def __setstate__(self, state):
        self.__init__(state["model_path"])

    def __repr__(self) -> str:
        return f"S2Tokenizer({self.model_path!r}, vocab_size={self.vocab_size})"
