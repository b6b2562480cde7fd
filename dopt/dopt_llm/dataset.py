"""The reference's JSON dataset: records whose ``text`` field is the prompt.

A JSON list of objects (``[{"text": ...}, ...]``) or JSON lines, one object per line.
Every record must carry a non-empty string ``text``; a record without one is an error that
names the file and the record, not a silently shorter calibration set.
"""
from __future__ import annotations

import json

from ..errors import DoptError
from ..formats.fileio import existing_file

MAX_DATASET_BYTES = 4 << 30


def _record_text(path, i, rec) -> str:
    if not isinstance(rec, dict) or "text" not in rec:
        found = (f"keys {sorted(rec)[:5]}" if isinstance(rec, dict)
                 else type(rec).__name__)
        raise DoptError("a dataset record has no 'text' field", file=str(path),
                        field=f"record {i}", expected='an object with a "text" string',
                        found=found, hint='store each sample as {"text": "..."}')
    text = rec["text"]
    if not isinstance(text, str) or not text.strip():
        raise DoptError("a dataset record's 'text' is not a non-empty string", file=str(path),
                        field=f"record {i}.text", found=repr(text)[:80])
    return text


def read_texts(files) -> list[str]:
    texts: list[str] = []
    for path in files:
        p = existing_file(path, field="dataset.train_files", max_bytes=MAX_DATASET_BYTES,
                          what="dataset file")
        raw = p.read_text(encoding="utf-8", errors="strict")
        try:
            data = json.loads(raw)
            records = data if isinstance(data, list) else [data]
        except json.JSONDecodeError as first:
            records = []
            for n, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise DoptError("the dataset is neither JSON nor JSON lines", file=str(p),
                                    field=f"line {n if n > 1 else first.lineno}",
                                    found=str(first),
                                    hint='write a JSON list [{"text": ...}, ...]') from None
        if not records:
            raise DoptError("the dataset file holds no records", file=str(p),
                            expected='at least one {"text": ...} record')
        texts.extend(_record_text(p, i, r) for i, r in enumerate(records))
    return texts
