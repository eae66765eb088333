"""Property tests: random Unicode lines through the readers and the tokenizer."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transformer.data.corpora import FilterReport, filter_pairs, read_parallel_files, read_text

# Lines as the readers define them: no "\n", no surrounding whitespace; any other character allowed.
line = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=40).map(str.strip)
# Round trip excludes U+2581, SentencePiece's own space symbol (documented in tokenizer.py).
normal_text = line.filter(lambda s: "\u2581" not in s)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(line, line), max_size=20))
def test_readers_keep_order_and_count(pairs):
    with tempfile.TemporaryDirectory() as d:
        src, tgt = Path(d) / "a.src", Path(d) / "a.tgt"
        src.write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
        tgt.write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
        assert read_parallel_files(src, tgt) == pairs
        assert read_text(src) == [s for s, _ in pairs]
        report = FilterReport()
        kept = list(filter_pairs(pairs, 30, report, "train"))
        assert kept == [p for p in pairs if p[0] and p[1] and len(p[0]) <= 30 and len(p[1]) <= 30]
        assert len(kept) + report.n_dropped("train") == len(pairs)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(normal_text, min_size=1, max_size=8))
def test_tokenizer_round_trip_random_unicode(tiny_tokenizer, texts):
    ids = tiny_tokenizer.encode_src_batch(texts)
    assert all(0 <= i < tiny_tokenizer.src_vocab_size for seq in ids for i in seq)
    assert tiny_tokenizer.decode_src_batch(ids) == texts
    assert [tiny_tokenizer.decode_tgt(tiny_tokenizer.encode_tgt(t)) for t in texts] == texts
