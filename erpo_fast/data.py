"""Prompt datasets: loading (.jsonl, .parquet, the built-in task), stable prompt ids, and the batch sampler.

Three layers, each with one job:

- `load_prompts(path)` reads records `{"prompt": str, "answer": str | int, "id"?: str | int}` into
  `PromptRecord(key, prompt, answer)`. The key is the `id` field when present, else the sha1 hex of the
  prompt text, so it names the prompt itself rather than its position in the file.
- `PromptIndex` turns keys into the dense integer ids that the history tracker indexes its flat arrays
  with. It only ever appends, and it is checkpointed, so a prompt keeps its id across restarts, dataset
  reorders and datasets that grow.
- `PromptSampler` draws batches of dataset rows in a seeded, epoch-wise shuffled order, split across
  ranks, and checkpoints its cursor so a resumed run draws exactly the batches it would have drawn.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from erpo_fast.errors import DataError

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".jsonl", ".parquet")


@dataclass(frozen=True)
class PromptRecord:
    key: str  # stable identity of the prompt (explicit id, or sha1 of the prompt text)
    prompt: str
    answer: str
    origin: str = dataclasses.field(default="", compare=False)  # "file: line N" or "row N", for error messages


def prompt_key(prompt: str) -> str:
    """Content key of a prompt without an explicit id: sha1 hex of its UTF-8 text."""
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()


# -- loading ---------------------------------------------------------------------------------------------


def load_prompts(path: str | Path) -> list[PromptRecord]:
    """Records of a `.jsonl` or `.parquet` file with `prompt` and `answer` fields and an optional `id`.

    Repeated explicit ids are an error. A prompt text repeated without ids is kept once (its records
    would share one key, hence one history); repeated with different answers it is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        raise DataError(f"unsupported dataset format {suffix or '(no extension)'!r} for {path}; "
                        f"use one of {', '.join(SUPPORTED_SUFFIXES)}")

    records: list[PromptRecord] = []
    seen: dict[str, tuple[str, PromptRecord]] = {}  # key -> (where it was first seen, record)
    num_repeats = 0
    for where, row in rows:
        record = _to_record(path, where, row)
        if record.key in seen:
            first_where, first = seen[record.key]
            if "id" in row and row["id"] is not None:
                raise DataError(f"{path}: {where}: duplicate id {record.key!r} (first at {first_where})")
            if first.answer != record.answer:
                raise DataError(f"{path}: {where}: prompt repeated from {first_where} with a different answer "
                                f"({record.answer!r} vs {first.answer!r})")
            num_repeats += 1
            continue
        seen[record.key] = (where, record)
        records.append(record)
    if not records:
        raise DataError(f"dataset is empty: {path}")
    if num_repeats:
        logger.warning("%s: %d repeated prompts without ids were dropped (kept their first occurrence)",
                       path, num_repeats)
    return records


def _read_jsonl(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {line_number}: malformed JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {line_number}: expected a JSON object, got {type(row).__name__}")
            yield f"line {line_number}", row


def _read_parquet(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt or non-parquet file
        raise DataError(f"{path}: cannot read parquet file ({exc})") from None
    for field in ("prompt", "answer"):
        if field not in table.column_names:
            raise DataError(f"{path}: missing field {field!r} (columns: {', '.join(table.column_names)})")
    columns = [c for c in ("id", "prompt", "answer") if c in table.column_names]
    for row_index, row in enumerate(table.select(columns).to_pylist()):
        yield f"row {row_index}", row


def _to_record(path: Path, where: str, row: Mapping[str, Any]) -> PromptRecord:
    for field in ("prompt", "answer"):
        if row.get(field) is None:
            raise DataError(f"{path}: {where}: missing field {field!r}")
    prompt = row["prompt"]
    if not isinstance(prompt, str):
        raise DataError(f"{path}: {where}: field 'prompt' must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise DataError(f"{path}: {where}: field 'prompt' is empty")
    answer = row["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DataError(f"{path}: {where}: field 'answer' must be a string or a number, "
                        f"got {type(answer).__name__}")
    explicit_id = row.get("id")
    if explicit_id is not None and (isinstance(explicit_id, bool) or not isinstance(explicit_id, (str, int))):
        raise DataError(f"{path}: {where}: field 'id' must be a string or an integer, "
                        f"got {type(explicit_id).__name__}")
    key = str(explicit_id) if explicit_id is not None else prompt_key(prompt)
    return PromptRecord(key=key, prompt=prompt, answer=str(answer), origin=f"{path}: {where}")


def problem_records(problems) -> list[PromptRecord]:
    """Prompt records of built-in task problems (anything with id, prompt and answer); keys are the ids."""
    return [PromptRecord(key=p.id, prompt=p.prompt, answer=p.answer) for p in problems]


# -- stable integer ids ----------------------------------------------------------------------------------


class PromptIndex:
    """Append-only map from prompt keys to dense integer ids 0, 1, 2, ... (the tracker's array rows).

    A key gets an id the first time it is seen and keeps it for the index's life; `state_dict()` goes
    into checkpoints so that it also keeps it across restarts, whatever order the dataset comes in.
    """

    def __init__(self, keys: Iterable[str] = ()):
        self._ids: dict[str, int] = {}
        self.add(keys)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key: object) -> bool:
        return key in self._ids

    def add(self, keys: Iterable[str]) -> np.ndarray:
        """Ids of `keys` (int64, in order), giving new keys the next free ids."""
        out = []
        for key in keys:
            if not isinstance(key, str):
                raise TypeError(f"prompt keys must be strings, got {type(key).__name__}")
            out.append(self._ids.setdefault(key, len(self._ids)))
        return np.asarray(out, dtype=np.int64)

    def ids(self, keys: Iterable[str]) -> np.ndarray:
        """Ids of keys already in the index (int64); an unknown key is an error."""
        try:
            return np.asarray([self._ids[key] for key in keys], dtype=np.int64)
        except KeyError as exc:
            raise KeyError(f"prompt key {exc.args[0]!r} is not in the index; use add() for new prompts") from None

    def keys(self) -> list[str]:
        """All keys, in id order."""
        return list(self._ids)

    def state_dict(self) -> dict[str, Any]:
        return {"keys": self.keys()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        keys = list(state["keys"])
        if len(set(keys)) != len(keys):
            raise ValueError("PromptIndex state holds repeated keys")
        self._ids = {key: i for i, key in enumerate(keys)}


# -- batch sampling --------------------------------------------------------------------------------------


class PromptSampler:
    """Seeded epoch-wise shuffled batches of dataset rows, split across data-parallel ranks.

    Each epoch is a fresh permutation of range(num_prompts) drawn from (seed, epoch); it is cut into global
    batches of `batch_size`, and a tail shorter than a batch is skipped (a different tail each epoch),
    so no batch holds a prompt twice. Every rank builds the same permutation and takes its own contiguous
    slice of each global batch. The state is global (epoch, cursor), so a run can also resume on a
    different number of ranks.
    """

    def __init__(self, num_prompts: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        for name, value, low in (("num_prompts", num_prompts, 1), ("batch_size", batch_size, 1),
                                 ("seed", seed, 0), ("rank", rank, 0), ("world_size", world_size, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"PromptSampler: {name} must be an integer >= {low}, got {value!r}")
        if batch_size > num_prompts:
            raise ValueError(f"PromptSampler: batch_size ({batch_size}) exceeds the number of prompts "
                             f"({num_prompts})")
        if batch_size % world_size:
            raise ValueError(f"PromptSampler: global batch_size ({batch_size}) must be divisible by "
                             f"world_size ({world_size})")
        if rank >= world_size:
            raise ValueError(f"PromptSampler: rank ({rank}) must be < world_size ({world_size})")
        self.num_prompts = int(num_prompts)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        self.cursor = 0  # index of the next global batch in this epoch's permutation
        self._order: np.ndarray | None = None  # permutation of self.epoch, built on demand

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts)

    def next_batch(self) -> list[int]:
        """This rank's dataset rows for the next global batch."""
        if self.cursor + self.batch_size > self.num_prompts:
            self.epoch += 1
            self.cursor = 0
            self._order = None
        if self._order is None:
            self._order = self._permutation(self.epoch)
        start = self.cursor + self.rank * self.local_batch_size
        batch = self._order[start:start + self.local_batch_size]
        self.cursor += self.batch_size
        return [int(i) for i in batch]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "num_prompts": self.num_prompts,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        for name in ("seed", "num_prompts", "batch_size"):
            if int(state[name]) != getattr(self, name):
                raise ValueError(f"PromptSampler: checkpoint has {name}={state[name]} but this run has "
                                 f"{getattr(self, name)}; the batches would not continue the same sequence")
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self._order = None
