"""SentencePiece subwords (BPE or unigram), one joint vocabulary or one per side.

A tokenizer is a folder (``RUN_DIR/tokenizer/``)::

    tokenizer.json   {"joint": true, "model_type": "bpe", "files": {"src": "spm.model", "tgt": "spm.model"}}
    spm.model        joint vocabulary   (or src.model + tgt.model when separate)

Special ids come from :mod:`transformer.data.vocab` (pad=0, unk=1, bos=2, eos=3) for every model.
Encoding returns subword ids without BOS/EOS; decoding skips pad/bos/eos ids.

Round trip: ``decode(encode(text)) == text`` for any text that the readers produce (no ``\\n``, no
surrounding whitespace) and that does not contain U+2581 ``▁`` (SentencePiece's own space symbol). This
holds because the models are trained with ``normalization_rule_name="identity"`` (no NFKC folding),
``remove_extra_whitespaces=False`` (runs of spaces kept) and ``byte_fallback=True`` (a character never
seen in training becomes UTF-8 byte pieces instead of ``<unk>``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import sentencepiece as spm

from transformer.data.vocab import BOS, BOS_ID, EOS, EOS_ID, PAD, PAD_ID, UNK, UNK_ID
from transformer.errors import TransformerError

PathLike = Union[str, os.PathLike]

_META = "tokenizer.json"
_SKIP_IDS = frozenset((PAD_ID, BOS_ID, EOS_ID))
# Sentences SentencePiece samples for training (it keeps a random subset of this size).
INPUT_SENTENCE_SIZE = 1_000_000


def _train_model(texts: Iterable[str], prefix: Path, vocab_size: int, model_type: str, seed: int,
                 num_threads: int, input_sentence_size: int) -> None:
    """Train one SentencePiece model to ``{prefix}.model`` from an iterator of sentences."""
    spm.set_random_generator_seed(seed)
    seen = {"lines": 0, "error": None}

    def guarded() -> Iterator[str]:
        # SentencePiece wraps an exception from the iterator in its own RuntimeError: keep ours to re-raise.
        try:
            for text in texts:
                seen["lines"] += bool(text.strip())
                yield text
        except TransformerError as exc:
            seen["error"] = exc
            raise

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=guarded(),
            model_prefix=str(prefix),
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=0.9995,  # rare characters: byte fallback, never <unk>
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            split_digits=True,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            pad_piece=PAD, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=1 << 16,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as exc:
        if seen["error"] is not None:
            raise seen["error"] from None
        if not seen["lines"]:
            raise TransformerError(
                "the tokenizer has no text to learn from: the training split is empty (or every line was "
                "filtered, e.g. longer than data.max_chars); check data.path and the training files"
            ) from None
        message = str(exc)
        match = re.search(r"value <= (\d+)", message)
        if "Vocabulary size" in message or match:
            limit = f" (at most {match.group(1)} here)" if match else ""
            raise TransformerError(
                f"config field data.vocab_size: {vocab_size} is too large for this corpus{limit}; "
                "set a smaller data.vocab_size"
            ) from None
        raise TransformerError(f"SentencePiece training failed: {message}") from None


def _model_sha256(path: Path) -> str:
    """Hash of a model's content; the training output path stored inside it is left out."""
    data = path.read_bytes()
    try:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(data)
        proto.trainer_spec.model_prefix = ""
        data = proto.SerializeToString(deterministic=True)
    except Exception:  # protobuf missing or a newer format: hash the raw bytes
        pass
    return hashlib.sha256(data).hexdigest()


class Tokenizer:
    """Subword tokenizer for the source and target sides (the same model for both when ``joint``)."""

    def __init__(self, src_model: Path, tgt_model: Path, joint: bool, model_type: str = "bpe"):
        self.joint = joint
        self.model_type = model_type
        self._files = {"src": Path(src_model), "tgt": Path(tgt_model)}
        self._src = spm.SentencePieceProcessor(model_file=str(src_model))
        self._tgt = self._src if joint else spm.SentencePieceProcessor(model_file=str(tgt_model))

    # --- building -----------------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        src_texts: Iterable[str],
        tgt_texts: Optional[Iterable[str]] = None,
        vocab_size: int = 8000,
        model_type: str = "bpe",
        joint: bool = True,
        out_dir: PathLike = "tokenizer",
        seed: int = 1,
        num_threads: Optional[int] = None,
        input_sentence_size: int = INPUT_SENTENCE_SIZE,
    ) -> "Tokenizer":
        """Train SentencePiece model(s) into ``out_dir`` and return the tokenizer.

        ``src_texts`` / ``tgt_texts`` are iterables of sentences (re-iterable when ``joint`` is False is
        not needed: each side is read once). With ``tgt_texts=None`` the tokenizer has one model for both
        sides (a language model's). A joint model is trained on both sides interleaved.

        Returns:
            the trained :class:`Tokenizer`, already saved in ``out_dir``.
        Raises:
            TransformerError: an unknown ``model_type``; ``vocab_size`` too large for the corpus.
        """
        if model_type not in ("bpe", "unigram"):
            raise TransformerError(f"config field data.tokenizer_type: {model_type!r} is not one of bpe, unigram")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        num_threads = num_threads or os.cpu_count() or 1
        common = dict(vocab_size=vocab_size, model_type=model_type, seed=seed, num_threads=num_threads,
                      input_sentence_size=input_sentence_size)
        if tgt_texts is None or joint:
            texts = src_texts if tgt_texts is None else _interleave(src_texts, tgt_texts)
            _train_model(texts, out_dir / "spm", **common)
            tok = cls(out_dir / "spm.model", out_dir / "spm.model", joint=True, model_type=model_type)
        else:
            _train_model(src_texts, out_dir / "src", **common)
            _train_model(tgt_texts, out_dir / "tgt", **common)
            tok = cls(out_dir / "src.model", out_dir / "tgt.model", joint=False, model_type=model_type)
        tok._write_meta(out_dir)
        return tok

    @classmethod
    def load(cls, directory: PathLike) -> "Tokenizer":
        """Load a tokenizer folder written by :meth:`train` or :meth:`save`.

        Raises:
            TransformerError: the folder or its files are missing or unreadable.
        """
        directory = Path(directory)
        meta_path = directory / _META
        if not meta_path.is_file():
            raise TransformerError(f"{directory} is not a tokenizer folder: {meta_path} does not exist")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            files = {side: directory / name for side, name in meta["files"].items()}
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise TransformerError(f"{meta_path} is not a valid tokenizer description ({exc})") from None
        for path in files.values():
            if not path.is_file():
                raise TransformerError(f"tokenizer model {path} is missing; train the tokenizer again")
        try:
            return cls(files["src"], files["tgt"], joint=bool(meta["joint"]), model_type=meta.get("model_type", "bpe"))
        except (OSError, RuntimeError) as exc:
            raise TransformerError(f"cannot read the SentencePiece model in {directory}: {exc}") from None

    def save(self, directory: PathLike) -> None:
        """Copy the model file(s) and ``tokenizer.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for path in set(self._files.values()):
            target = directory / path.name
            if target.resolve() != path.resolve():
                shutil.copyfile(path, target)
        self._write_meta(directory)

    def _write_meta(self, directory: Path) -> None:
        meta = {
            "joint": self.joint,
            "model_type": self.model_type,
            "files": {side: path.name for side, path in self._files.items()},
            "src_vocab_size": self.src_vocab_size,
            "tgt_vocab_size": self.tgt_vocab_size,
        }
        (directory / _META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    # --- properties ---------------------------------------------------------------------------------

    @property
    def src_vocab_size(self) -> int:
        return self._src.get_piece_size()

    @property
    def tgt_vocab_size(self) -> int:
        return self._tgt.get_piece_size()

    @property
    def model_files(self) -> dict[str, Path]:
        """``{"src": path, "tgt": path}`` (the same path twice when joint)."""
        return dict(self._files)

    def fingerprint(self) -> str:
        """A hash of the model file(s): the encoding cache is keyed by it."""
        h = hashlib.sha256()
        for side in ("src", "tgt"):
            h.update(_model_sha256(self._files[side]).encode())
        return h.hexdigest()

    # --- encoding and decoding ----------------------------------------------------------------------

    def encode_src(self, text: str) -> list[int]:
        """Subword ids of a source sentence (no BOS/EOS)."""
        return self._src.encode(text)

    def encode_tgt(self, text: str) -> list[int]:
        """Subword ids of a target sentence (no BOS/EOS)."""
        return self._tgt.encode(text)

    def encode_src_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._src.encode(list(texts))

    def encode_tgt_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._tgt.encode(list(texts))

    def decode_src(self, ids: Iterable[int]) -> str:
        """Text of source ids; pad/bos/eos ids are skipped (decoding does not stop at them)."""
        return self._src.decode([int(i) for i in ids if int(i) not in _SKIP_IDS])

    def decode_tgt(self, ids: Iterable[int]) -> str:
        """Text of target ids; pad/bos/eos ids are skipped (decoding does not stop at them)."""
        return self._tgt.decode([int(i) for i in ids if int(i) not in _SKIP_IDS])

    def decode_src_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode_src(ids) for ids in batch]

    def decode_tgt_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode_tgt(ids) for ids in batch]

    def src_pieces(self, text: str) -> list[str]:
        """The subword strings of a source sentence (for inspection)."""
        return self._src.encode(text, out_type=str)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.model_type}, joint={self.joint}, src_vocab_size={self.src_vocab_size}, "
                f"tgt_vocab_size={self.tgt_vocab_size})")


def _interleave(a: Iterable[str], b: Iterable[str]) -> Iterator[str]:
    for x, y in itertools.zip_longest(a, b):
        if x is not None:
            yield x
        if y is not None:
            yield y


__all__ = ["Tokenizer"]
