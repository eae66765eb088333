"""The one inference API: load a run, then translate or generate. The CLI and the server use only this.

    translator = Translator.load("runs/bible_en_de")            # or Translator(model, tokenizer, DecodeConfig())
    translator.translate(["In the beginning God created the heaven and the earth."])
    translator.translate_nbest(["..."], nbest=4)                # [[Translation(text, score, logprob), ...]]
    translate_file(translator, "test.en", "test.hyp.de")        # or stdin / stdout

    lm = LanguageModel.load("runs/shakespeare")
    lm.generate("ROMEO:", max_new_tokens=100, temperature=0.8, top_p=0.9, stop=["\\n\\n"], seed=1)
    lm.perplexity("To be, or not to be")

Inputs are encoded as ``ids(src) + [EOS]``. Empty (or all-whitespace) lines translate to empty output
without running the model. Lines longer than the limit (``decode.max_input_len``, at most the model's
``max_positions``, EOS included) are truncated with a logged warning, or rejected when
``decode.long_input == "error"``. Translation batches hold at most ``decode.max_tokens`` source tokens
(padding included), are formed over length-sorted inputs, and results come back in input order.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
from pathlib import Path
from typing import IO, Any, Callable, Iterator, NamedTuple, Optional, Sequence, Union

import torch

from transformer.config import Config, DecodeConfig
from transformer.data.corpora import count_lines  # re-exported
from transformer.data.vocab import BOS_ID, EOS_ID, PAD_ID
from transformer.decoding import beam_search, greedy_search, sample
from transformer.decoding.common import length_penalty as length_penalty_of
from transformer.decoding.common import max_positions
from transformer.errors import TransformerError
from transformer.model import Transformer, TransformerLM
from transformer.model import freeze as freeze_model  # a name free for the ``freeze`` arguments below

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
_LONG_INPUT = ("truncate", "error")


class Translation(NamedTuple):
    """One output of :meth:`Translator.translate_nbest`.

    ``score`` ranks the n-best list: ``logprob / lp(len)`` with ``len`` the output tokens including EOS and
    ``lp`` the length penalty of ``decode.length_penalty_form`` (GNMT's ``((5 + len) / 6) ** alpha`` by
    default); ``logprob`` is the summed log-probability of those tokens.
    """

    text: str
    score: float
    logprob: float


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _load(path: PathLike, device: Union[str, torch.device], arch: str) -> tuple[Any, Config, Any]:
    """(model, config, tokenizer) of a run or checkpoint directory, checked to be of ``arch``."""
    if not Path(path).exists():
        raise TransformerError(f"checkpoint path {path} does not exist; give a run directory or a checkpoint directory")
    from transformer.training.checkpoint import load_model  # lazy: inference without training's imports

    model, cfg, tokenizer = load_model(path, device=device)
    if cfg.model.arch != arch:
        other = "LanguageModel" if cfg.model.arch == "lm" else "Translator"
        raise TransformerError(
            f"{path} holds a model.arch={cfg.model.arch!r} model, not {arch!r}; load it with {other} instead"
        )
    return model, cfg, tokenizer


class _InferenceModel:
    """What both inference APIs share: a model in eval mode on a device, its tokenizer, default settings."""

    arch = ""  # the model.arch that ``load`` accepts

    def __init__(
        self, model: Any, tokenizer: Any, decode_cfg: Optional[DecodeConfig] = None, device: Union[str, torch.device, None] = None,
        quantize: Optional[str] = None, dtype: Optional[str] = None, freeze: bool = True,
    ) -> None:
        self.cfg = decode_cfg or DecodeConfig()
        if device is not None:
            model = model.to(device)
        if dtype is not None:  # weights and activations in this dtype; scores stay float32 (decoding/)
            if dtype not in DTYPES:
                raise TransformerError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
            if quantize:
                raise TransformerError("give either a dtype or quantize='int8', not both")
            model = model.to(DTYPES[dtype])
        if quantize:  # an int8 copy for CPU inference (transformer.model.quantize)
            from transformer.model.quantize import quantize as quantize_model

            model = quantize_model(model, quantize)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else _model_device(model)
        if self.cfg.keep_freed_memory and self.device.type == "cpu":
            from transformer.host_memory import keep_freed_memory

            keep_freed_memory()  # for the whole process: each step's logits and KV buffers reuse freed memory
        # What the searches run: on the CPU (float32 or int8) a copy frozen for decoding, the same outputs
        # in fewer, larger calls (transformer.model.frozen); on a CUDA GPU the model frozen with a
        # static KV cache whose step is replayed as CUDA graphs (transformer.model.static); elsewhere, or with
        # freeze=False, the model.
        self.search_model = self.model
        self._search_lock = threading.Lock()  # searches from several threads take turns (one set of static buffers)
        if freeze and isinstance(model, (Transformer, TransformerLM)):
            if self.device.type == "cpu" and dtype in (None, "fp32"):
                self.search_model = freeze_model(self.model)
            elif self.device.type == "cuda":
                self.search_model = freeze_model(self.model, graphs=True)

    @classmethod
    def load(cls, path: PathLike, device: Union[str, torch.device] = "cpu", decode_cfg: Optional[DecodeConfig] = None,
             quantize: Optional[str] = None, dtype: Optional[str] = None, freeze: bool = True):
        """From a run directory or checkpoint directory (its config's ``decode`` section is the default).
        ``quantize="int8"`` runs the Linear layers in int8 on the CPU (``transformer.model.quantize``);
        ``dtype="bf16"`` (or ``"fp16"``) casts the model for inference, the fast path on a GPU (on a CPU
        without native bf16 it is slower than the default float32).

        Raises:
            TransformerError: the path does not exist, the checkpoint is corrupt or incomplete, it holds
                the other kind of model, or the quantisation is unknown or asked for on a GPU.
        """
        model, cfg, tokenizer = _load(path, device, cls.arch)
        return cls(model, tokenizer, decode_cfg or cfg.decode, device, quantize=quantize, dtype=dtype, freeze=freeze)


def token_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches of at most ``max_tokens`` padded tokens, longest first.

    A single item longer than ``max_tokens`` gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    batch: list[int] = []
    width = 0
    for i in order:
        if batch and max(width, lengths[i]) * (len(batch) + 1) > max_tokens:
            batches.append(batch)
            batch, width = [], 0
        batch.append(i)
        width = max(width, lengths[i])
    if batch:
        batches.append(batch)
    return batches


def _pad(seqs: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """Right-pad id lists with PAD into a (B, max_len) long tensor."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out.to(device)


class Translator(_InferenceModel):
    """Translation with an encoder-decoder model: batched, length-sorted, greedy or beam search.

    Args:
        model: a :class:`transformer.model.Transformer` (or anything with ``encode``/``decode``/``new_cache``).
        tokenizer: has ``encode_src(str) -> list[int]`` and ``decode_tgt(ids) -> str``.
        decode_cfg: default search settings; each call may override them.
        device: where to run (default: where the model's parameters are).
        quantize: ``"int8"`` runs an int8 copy of the model's Linear layers (CPU only).
        dtype: ``"bf16"`` or ``"fp16"`` casts the model (the GPU's fast path); default: as stored, float32.
        freeze: search on a copy of the model frozen for decoding (``transformer.model.frozen``: the same
            outputs, faster): on the CPU, and on a CUDA GPU with its decoder step replayed as CUDA graphs
            (``transformer.model.static``; calls from several threads take turns). It is taken once, here: pass
            ``False`` to decode a model that is still being trained.
    Raises:
        TransformerError: ``decode_cfg.long_input`` is not ``"truncate"`` or ``"error"``, or ``quantize`` is
            unknown or asked for on a GPU.
    """

    arch = "transformer"

    def __init__(
        self, model: Any, tokenizer: Any, decode_cfg: Optional[DecodeConfig] = None, device: Union[str, torch.device, None] = None,
        quantize: Optional[str] = None, dtype: Optional[str] = None, freeze: bool = True,
    ) -> None:
        super().__init__(model, tokenizer, decode_cfg, device, quantize, dtype, freeze)
        if self.cfg.long_input not in _LONG_INPUT:
            raise TransformerError(f"config field decode.long_input: {self.cfg.long_input!r} is not one of truncate, error")

    @property
    def max_input_len(self) -> int:
        """The longest source accepted, in tokens including EOS."""
        limits = [n for n in (self.cfg.max_input_len, max_positions(self.model)) if n]
        return min(limits) if limits else sys.maxsize

    def encode(self, sentences: Sequence[str], first_line: int = 1) -> list[Optional[list[int]]]:
        """Source ids (``ids + [EOS]``) per sentence; None for an empty line. Over-long lines per ``long_input``.

        Raises:
            TransformerError: a line over the limit when ``decode.long_input == "error"`` (naming the line).
        """
        limit = self.max_input_len
        out: list[Optional[list[int]]] = []
        truncated: list[int] = []
        for n, text in enumerate(sentences, start=first_line):
            if not text.strip():
                out.append(None)
                continue
            ids = list(self.tokenizer.encode_src(text)) + [EOS_ID]
            if len(ids) > limit:
                if self.cfg.long_input == "error":
                    raise TransformerError(
                        f"input line {n} has {len(ids)} tokens (EOS included), more than the limit of {limit} "
                        "(decode.max_input_len / model.max_positions); shorten it or set decode.long_input=truncate"
                    )
                truncated.append(n)
                ids = ids[: limit - 1] + [EOS_ID]
            out.append(ids)
        if truncated:
            shown = ", ".join(map(str, truncated[:10])) + (", ..." if len(truncated) > 10 else "")
            log.warning("%d input line(s) truncated to %d tokens: line %s", len(truncated), limit, shown)
        return out

    def translate(
        self,
        sentences: Sequence[str],
        *,
        beam: Optional[int] = None,
        length_penalty: Optional[float] = None,
        length_penalty_form: Optional[str] = None,
        max_len_a: Optional[float] = None,
        max_len_b: Optional[int] = None,
        max_tokens: Optional[int] = None,
        on_batch: Optional[Callable[[int], None]] = None,
        first_line: int = 1,
    ) -> list[str]:
        """Translate sentences (best hypothesis each), in input order.

        Args:
            beam, length_penalty, length_penalty_form, max_len_a, max_len_b, max_tokens: override
                ``decode_cfg``; beam 1 = greedy.
            on_batch: called with the number of sentences after each batch (progress bars).
            first_line: the line number of ``sentences[0]`` in messages.
        Returns:
            one string per input sentence ("" for an empty line).
        Raises:
            TransformerError: bad settings, or an over-long line when ``decode.long_input == "error"``.
        """
        nbest = self.translate_nbest(
            sentences, nbest=1, beam=beam, length_penalty=length_penalty, length_penalty_form=length_penalty_form,
            max_len_a=max_len_a, max_len_b=max_len_b, max_tokens=max_tokens, on_batch=on_batch, first_line=first_line,
        )
        return [hyps[0].text for hyps in nbest]

    def translate_nbest(
        self,
        sentences: Sequence[str],
        *,
        nbest: Optional[int] = None,
        beam: Optional[int] = None,
        length_penalty: Optional[float] = None,
        length_penalty_form: Optional[str] = None,
        max_len_a: Optional[float] = None,
        max_len_b: Optional[int] = None,
        max_tokens: Optional[int] = None,
        on_batch: Optional[Callable[[int], None]] = None,
        first_line: int = 1,
    ) -> list[list[Translation]]:
        """Translate sentences, returning the ``nbest`` best :class:`Translation` of each, best first.

        An empty line gets ``[Translation("", 0.0, 0.0)]``. Other arguments as :meth:`translate`.

        Raises:
            TransformerError: ``nbest`` larger than ``beam``, non-positive sizes, an unknown length penalty
                form, or an over-long line when ``decode.long_input == "error"``.
        """
        cfg = self.cfg
        nbest = cfg.nbest if nbest is None else nbest
        beam = cfg.beam if beam is None else beam
        alpha = cfg.length_penalty if length_penalty is None else length_penalty
        lp_form = cfg.length_penalty_form if length_penalty_form is None else length_penalty_form
        max_len_a = cfg.max_len_a if max_len_a is None else max_len_a
        max_len_b = cfg.max_len_b if max_len_b is None else max_len_b
        max_tokens = cfg.max_tokens if max_tokens is None else max_tokens
        if beam < 1 or max_tokens < 1:
            raise TransformerError(f"beam and max_tokens must be positive, got beam={beam}, max_tokens={max_tokens}")
        if not 1 <= nbest <= beam:
            raise TransformerError(f"nbest must be between 1 and the beam size {beam}, got {nbest}")
        length_penalty_of(1, alpha, lp_form)  # an unknown form fails before any work

        encoded = self.encode(sentences, first_line)
        results: list[list[Translation]] = [[Translation("", 0.0, 0.0)] for _ in sentences]
        todo = [i for i, ids in enumerate(encoded) if ids is not None]
        if len(todo) < len(sentences) and on_batch is not None:
            on_batch(len(sentences) - len(todo))
        for batch in token_batches([len(encoded[i]) for i in todo], max_tokens):
            indices = [todo[j] for j in batch]
            src = _pad([encoded[i] for i in indices], self.device)  # (B,S)
            with self._search_lock:  # a graphed (static-cache) model decodes one search at a time
                if beam == 1:
                    hyps = [[h] for h in greedy_search(self.search_model, src, max_len_a, max_len_b)]
                else:
                    hyps = beam_search(self.search_model, src, beam, alpha, max_len_a, max_len_b, nbest, lp_form)
            for i, sent_hyps in zip(indices, hyps):
                results[i] = [
                    Translation(
                        self.tokenizer.decode_tgt(h.tokens),
                        # greedy ranks by log-probability; report the same normalised score as beam search
                        h.logprob / length_penalty_of(len(h.tokens) + 1, alpha, lp_form) if beam == 1 else h.score,
                        h.logprob,
                    )
                    for h in sent_hyps
                ] or [Translation("", float("-inf"), float("-inf"))]
            if on_batch is not None:
                on_batch(len(indices))
        return results


def _open_in(path: Optional[PathLike]) -> IO:
    if path is None or str(path) == "-":
        return sys.stdin
    if not Path(path).is_file():
        raise TransformerError(f"input file {path} does not exist")
    return open(path, "rb")  # decoded line by line, so that bad UTF-8 is reported at its exact line


def _open_out(path: Optional[PathLike]) -> tuple[IO[str], Optional[Path]]:
    """(stream, temporary path): a file is written under a temporary name, renamed when all went well."""
    if path is None or str(path) == "-":
        return sys.stdout, None
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(tmp, "w", encoding="utf-8"), tmp
    except OSError as exc:
        raise TransformerError(f"cannot write the output file {path} ({exc.strerror or exc}); choose another --output") from None


def _chunks(stream: IO, size: int, where: str) -> Iterator[list[str]]:
    """Lines (without their line ending) in lists of ``size``; a binary stream is decoded line by line."""
    chunk: list[str] = []
    n = 0
    fix = "re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
    try:
        for n, line in enumerate(stream, start=1):
            if isinstance(line, bytes):
                try:
                    line = line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise TransformerError(f"{where}: line {n} is not UTF-8 ({exc.reason} at byte {exc.start}); {fix}") from None
            chunk.append(line.rstrip("\r\n"))
            if len(chunk) >= size:
                yield chunk
                chunk = []
    except UnicodeDecodeError as exc:  # a text stream (stdin) decodes ahead of the line it yields
        raise TransformerError(f"{where}: text at or after line {n + 1} is not UTF-8 ({exc.reason}); {fix}") from None
    if chunk:
        yield chunk


def translate_file(
    translator: Translator,
    input_path: Optional[PathLike] = None,
    output_path: Optional[PathLike] = None,
    *,
    nbest: Optional[int] = None,
    progress: Optional[bool] = None,
    buffer_lines: Optional[int] = None,
    **options: Any,
) -> int:
    """Translate a file (or stdin: None or "-") line by line into a file (or stdout: None or "-").

    Lines are read ``buffer_lines`` at a time (default 10000; 1 for an interactive terminal), batched by
    tokens inside each buffer, and written in input order. With ``nbest > 1`` (default:
    ``decode.nbest``) each output line is ``LINE_NUMBER<TAB>SCORE<TAB>TEXT``, ``nbest`` lines per input
    line, best first. An output file is written under a temporary name and renamed at the end, so an
    error (bad input at line N, a full disk, Ctrl-C) leaves an existing file as it was.

    Args:
        options: passed to :meth:`Translator.translate_nbest` (beam, length_penalty, max_len_a, ...).
        progress: a tqdm bar on stderr; default: on when reading a file.
    Returns:
        the number of input lines translated.
    Raises:
        TransformerError: a missing input file, non-UTF-8 input, bad search settings.
    """
    nbest = translator.cfg.nbest if nbest is None else nbest
    from_file = input_path is not None and str(input_path) != "-"
    if buffer_lines is None:
        buffer_lines = 1 if not from_file and sys.stdin.isatty() else 10_000
    where = str(input_path) if from_file else "stdin"
    source = _open_in(input_path)
    bar = None
    if progress if progress is not None else from_file:
        from tqdm import tqdm

        bar = tqdm(total=count_lines(input_path) if from_file else None, unit="sent", file=sys.stderr, desc="translate")
    sink, tmp = _open_out(output_path)
    n_lines = 0
    done = False
    try:
        for chunk in _chunks(source, buffer_lines, where):
            results = translator.translate_nbest(
                chunk, nbest=nbest, on_batch=bar.update if bar is not None else None, first_line=n_lines + 1,
                **options,
            )
            for n, hyps in enumerate(results, start=n_lines + 1):
                if nbest > 1:
                    sink.writelines(f"{n}\t{h.score:.4f}\t{_one_line(h.text)}\n" for h in hyps)
                else:
                    sink.write(_one_line(hyps[0].text) + "\n")
            sink.flush()
            n_lines += len(chunk)
        done = True
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            raise
        raise TransformerError(f"cannot write the output file {output_path} ({exc.strerror or exc})") from None
    finally:
        if bar is not None:
            bar.close()
        if source is not sys.stdin:
            source.close()
        if tmp is not None:
            sink.close()
            if done:
                os.replace(tmp, output_path)
            else:
                tmp.unlink(missing_ok=True)
    return n_lines


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")


class LanguageModel(_InferenceModel):
    """Generation and scoring with a decoder-only model.

    Args:
        model: a :class:`transformer.model.TransformerLM`.
        tokenizer: has ``encode_src(str)`` and ``decode_src(ids)`` (an LM's tokenizer has one model for both sides).
        decode_cfg: default sampling settings (temperature, top_k, top_p, max_new_tokens).
        device: where to run (default: where the model's parameters are).
        quantize: ``"int8"`` runs an int8 copy of the model's Linear layers (CPU only).
        freeze: sample from a copy frozen for decoding, on a CUDA GPU with its step replayed as CUDA graphs
            (see :class:`Translator`).
    """

    arch = "lm"

    @property
    def max_positions(self) -> int:
        return max_positions(self.model) or sys.maxsize

    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        stop: Optional[Sequence[str]] = None,
        seed: Optional[int] = None,
    ) -> str:
        """Continue ``prompt``; returns the continuation only (without the prompt).

        Generation starts from ``[BOS] + ids(prompt)`` and ends at EOS, after ``max_new_tokens``, at the
        model's last position, or just before the first occurrence of a ``stop`` string (which is not
        included). ``temperature == 0`` is greedy. The same ``seed`` gives the same text. A prompt that
        does not fit the model's positions keeps its last tokens (with a warning).

        Raises:
            TransformerError: a negative temperature, ``top_p`` outside (0, 1] or a negative ``max_new_tokens``.
        """
        cfg = self.cfg
        max_new_tokens = cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        temperature = cfg.temperature if temperature is None else temperature
        top_k = cfg.top_k if top_k is None else top_k
        top_p = cfg.top_p if top_p is None else top_p
        if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 0:
            raise TransformerError(
                f"need temperature >= 0, 0 < top_p <= 1 and max_new_tokens >= 0; got {temperature}, {top_p}, {max_new_tokens}"
            )
        prompt_ids = [BOS_ID] + list(self.tokenizer.encode_src(prompt))
        if len(prompt_ids) >= self.max_positions:
            log.warning("prompt of %d tokens keeps its last %d (model.max_positions)", len(prompt_ids), self.max_positions - 1)
            prompt_ids = prompt_ids[-(self.max_positions - 1) :]
        max_new_tokens = min(max_new_tokens, self.max_positions - len(prompt_ids))
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        prefix = self.tokenizer.decode_src(prompt_ids)
        new_ids: list[int] = []
        text = ""
        stops = [s for s in stop or () if s]
        with self._search_lock:  # a graphed (static-cache) model generates one text at a time
            for token in sample(self.search_model, prompt_ids, max_new_tokens, temperature, top_k, top_p, generator):
                new_ids.append(token)
                # Decode with the prompt so that word boundaries at the seam come out right.
                full = self.tokenizer.decode_src(prompt_ids + new_ids)
                text = full[len(prefix) :] if full.startswith(prefix) else self.tokenizer.decode_src(new_ids)
                hits = [i for i in (text.find(s) for s in stops) if i >= 0]
                if hits:
                    return text[: min(hits)]
        return text

    @torch.no_grad()
    def score(self, text: str) -> dict[str, float]:
        """Negative log-likelihood of ``ids(text) + [EOS]`` given ``[BOS]`` and the tokens before.

        Text longer than the model's positions is scored in consecutive windows (no context across them).

        Returns:
            {"nll": summed NLL in nats, "tokens": scored tokens, "perplexity": exp(nll / tokens)}
        """
        ids = [BOS_ID] + list(self.tokenizer.encode_src(text)) + [EOS_ID]
        window = min(self.max_positions, len(ids) - 1)
        nll, n = 0.0, 0
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start : start + window + 1]], device=self.device)  # (1,T+1)
            logits = self.model.decode(chunk[:, :-1])  # (1,T,V)
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            nll -= float(logprobs.gather(2, chunk[:, 1:, None]).sum())  # (1,T,1)
            n += chunk.size(1) - 1
        return {"nll": nll, "tokens": n, "perplexity": math.exp(nll / n)}

    def perplexity(self, text: str) -> float:
        """``exp`` of the mean per-token NLL of ``text`` (see :meth:`score`)."""
        return self.score(text)["perplexity"]


__all__ = ["Translation", "Translator", "LanguageModel", "translate_file", "token_batches", "count_lines"]
