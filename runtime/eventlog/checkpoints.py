"""Signed checkpoints: the anchor at the end of every run's hash chain, and of the store.

A run's chain shows an edit of any event but its last, and cannot show a cut tail, a deleted
run, or a chain recomputed from the edit on (SHA-256 needs no key). So every append also
writes, in the same transaction:

- per run, its head: the last seq, the hash of the last event (what the next one links to),
  `chain_from` (the first seq whose link covers the event's topic: runs written before links
  did so keep their older links below it), all under an HMAC-SHA256 with the store's key;
- for the store, the number of runs and the sum (mod 2**256) of a digest of every run's head,
  under the same key: a run deleted whole, checkpoint and all, changes both.

`cairn verify` recomputes every head from the events and checks both. What this cannot stop:
someone holding the key can rewrite the store and sign it again, and a store wiped together
with all its checkpoints reads as a store never written (keep `cairn verify --json`'s `store`
head somewhere else to tell). The key: `CAIRN_CHAIN_KEY` (hex), else a file
(`CAIRN_CHAIN_KEY_FILE`, default `chain.key` in the data directory), made on first use.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

# The store's own row in the checkpoints table (no run has this id).
STORE_ROW = uuid.UUID(int=0)
MODULUS = 2**256


class ChainKeyError(ValueError):
    """The key that signs checkpoints cannot be read or made; the message names the fix."""


@dataclass(frozen=True)
class Head:
    """Where a run's chain ends: its last event's seq and hash, and from which seq on its links
    cover the topic."""

    run_id: uuid.UUID
    seq: int
    hash: str
    chain_from: int = 1

    def term(self) -> int:
        """This head's share of the store's sum."""
        digest = hashlib.sha256(f"{self.run_id}|{self.seq}|{self.hash}".encode()).digest()
        return int.from_bytes(digest, "big")


@dataclass(frozen=True)
class StoreHead:
    """How many runs the store holds and the sum of their heads' terms."""

    runs: int
    total: int

    def with_heads(self, old: Iterable[Head], new: Iterable[Head]) -> StoreHead:
        """The store head once `old` heads (those being replaced) give way to `new` ones."""
        olds = list(old)
        news = list(new)
        total = (self.total - sum(h.term() for h in olds) + sum(h.term() for h in news)) % MODULUS
        return StoreHead(self.runs + len(news) - len(olds), total)


EMPTY = StoreHead(0, 0)


class ChainKey:
    """The secret the checkpoints are signed with (HMAC-SHA256)."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ChainKeyError("the chain key must be at least 16 bytes (32 hex digits)")
        self._secret = secret

    @classmethod
    def from_hex(cls, text: str, source: str) -> ChainKey:
        try:
            return cls(bytes.fromhex(text.strip()))
        except ValueError:
            raise ChainKeyError(
                f"{source} must hold the chain key as hex digits (e.g. `openssl rand -hex 32`)"
            ) from None

    @classmethod
    def from_file(cls, path: Path, *, create: bool) -> ChainKey:
        """The key in `path`; made there (mode 0600) when it is missing and `create`."""
        try:
            return cls.from_hex(path.read_text(), f"the chain key file {path}")
        except FileNotFoundError:
            if not create:
                raise ChainKeyError(
                    f"no chain key at {path}: checkpoints cannot be checked without the key "
                    "that signed them (set CAIRN_CHAIN_KEY or CAIRN_CHAIN_KEY_FILE)"
                ) from None
        except OSError as exc:
            raise ChainKeyError(f"cannot read the chain key file {path}: {exc.strerror}") from None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # made by another process just now
            return cls.from_file(path, create=False)
        except OSError as exc:
            raise ChainKeyError(f"cannot write the chain key file {path}: {exc.strerror}") from None
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
        return cls.from_file(path, create=False)

    def sign_run(self, head: Head) -> str:
        text = f"run|{head.run_id}|{head.seq}|{head.hash}|{head.chain_from}"
        return hmac.new(self._secret, text.encode(), hashlib.sha256).hexdigest()

    def sign_store(self, head: StoreHead) -> str:
        text = f"store|{head.runs}|{head.total:064x}"
        return hmac.new(self._secret, text.encode(), hashlib.sha256).hexdigest()

    def task_key(self, task_id: str) -> str:
        """The secret a task is sent with and its result must carry back: derived from the
        key, so every coordinator sharing the store derives the same one, and never stored."""
        return hmac.new(self._secret, f"task|{task_id}".encode(), hashlib.sha256).hexdigest()[:32]

    def task_key_matches(self, task_id: str, presented: str) -> bool:
        return hmac.compare_digest(self.task_key(task_id), presented)

    def run_signed(self, head: Head, mac: str) -> bool:
        return hmac.compare_digest(self.sign_run(head), mac)

    def store_signed(self, head: StoreHead, mac: str) -> bool:
        return hmac.compare_digest(self.sign_store(head), mac)


@dataclass(frozen=True)
class Checkpoint:
    """A stored checkpoint row: a run's head (or the store's) and its signature."""

    head: Head
    mac: str


def advance(
    key: ChainKey,
    appended: Mapping[uuid.UUID, Head],
    before: Mapping[uuid.UUID, Checkpoint],
    store: Checkpoint | None,
) -> list[Checkpoint]:
    """The checkpoint rows to write for an append: each touched run's new head (keeping the
    `chain_from` it had) and the store's row. `appended`: each run's last appended event, with
    `chain_from` its first appended seq (used for a run not checkpointed before)."""
    rows: list[Checkpoint] = []
    new_heads: list[Head] = []
    for run_id, head in appended.items():
        old = before.get(run_id)
        chain_from = old.head.chain_from if old is not None else head.chain_from
        new = Head(run_id, head.seq, head.hash, chain_from)
        new_heads.append(new)
        rows.append(Checkpoint(new, key.sign_run(new)))
    current = EMPTY if store is None else store_head_of(store)
    after = current.with_heads((c.head for c in before.values()), new_heads)
    rows.append(Checkpoint(store_row(after), key.sign_store(after)))
    return rows


def store_row(head: StoreHead) -> Head:
    """The store head as a row of the checkpoints table."""
    return Head(STORE_ROW, head.runs, f"{head.total:064x}", 0)


def store_head_of(row: Checkpoint) -> StoreHead:
    return StoreHead(row.head.seq, int(row.head.hash, 16))
