"""The data stage: corpora and built-in datasets, SentencePiece tokenizer, encoding cache, batching.

    from transformer.data import prepare_data, make_batches
    data = prepare_data(cfg, run_dir)                 # tokenizer, train/valid datasets, raw valid text
    for batch in make_batches(data.train, cfg.data.max_tokens, epoch=0):
        logits = model(batch.src_tokens, batch.tgt_input)
"""

from transformer.data.batching import Batch, TokenBatchSampler, collate, collate_lm, make_batches, sampler_for
from transformer.data.cache import EncodedSplit, TokenArray, encode_corpus
from transformer.data.corpora import (
    Corpus, FilterReport, filter_pairs, filter_texts, jsonl_file, parallel_file_paths, parallel_files,
    read_jsonl, read_parallel_files, read_text, read_tsv, text_files, tsv_file,
)
from transformer.data.datasets import (
    BIBLE_TRANSLATIONS, Splits, bible, bible_translation, download_multi30k, multi30k, shakespeare,
)
from transformer.data.prepare import PreparedData, load_sources, prepare_data
from transformer.data.token_datasets import LMDataset, ParallelDataset
from transformer.data.tokenizer import Tokenizer
from transformer.data.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID

__all__ = [
    "Batch", "TokenBatchSampler", "collate", "collate_lm", "make_batches", "sampler_for",
    "EncodedSplit", "TokenArray", "encode_corpus",
    "Corpus", "FilterReport", "filter_pairs", "filter_texts", "jsonl_file", "parallel_file_paths",
    "parallel_files", "read_jsonl", "read_parallel_files", "read_text", "read_tsv", "text_files", "tsv_file",
    "BIBLE_TRANSLATIONS", "Splits", "bible", "bible_translation", "download_multi30k", "multi30k", "shakespeare",
    "PreparedData", "load_sources", "prepare_data", "LMDataset", "ParallelDataset", "Tokenizer",
    "PAD_ID", "UNK_ID", "BOS_ID", "EOS_ID",
]
