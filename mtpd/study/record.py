"""A study's record of finished runs: row -> seed -> AP, each stage's AP, the weights it trained with, seconds,
the row's fingerprint and the date. Written whole after each run (a kill mid-write keeps the last record)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from mtpd.study.spec import StudyError

Log = Callable[[str], None]


def load_record(path: Path) -> dict[str, dict[int, dict]]:
    """Row -> seed -> finished run (AP, each stage's AP, seconds, fingerprint, date)."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StudyError(f"{path}: not valid JSON ({e}); restore it or delete the broken entry") from None
    return {r: {int(s): e for s, e in d.items()} for r, d in raw.items()}


def save_record(path: Path, record: dict[str, dict[int, dict]]) -> None:
    data = {r: {str(s): record[r][s] for s in sorted(record[r])} for r in sorted(record)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")  # a kill mid-write must not cost the finished runs
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def set_aside_stale(record: dict[str, dict[int, dict]], prints: dict[str, str], log: Log) -> None:
    """Runs of a row whose fingerprint changed move to ``row@old`` (they are not this row's); runs set aside
    earlier whose fingerprint is the row's again come back (a row edited, then edited back)."""
    for r, fp in prints.items():
        for s in [s for s, e in record.get(r, {}).items() if e.get("fingerprint") != fp]:
            entry = record[r].pop(s)
            log(f"{r} seed {s} was trained from another definition of {r}: set aside, it trains again")
            record.setdefault(f"{r}@{entry.get('fingerprint')}", {}).setdefault(s, entry)
        back = record.get(f"{r}@{fp}", {})
        for s in [s for s in back if s not in record.get(r, {})]:
            record.setdefault(r, {})[s] = back.pop(s)
            log(f"{r} seed {s}: its earlier run of this same definition is back in the record")
        if f"{r}@{fp}" in record and not record[f"{r}@{fp}"]:
            del record[f"{r}@{fp}"]
