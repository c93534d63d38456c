"""Offline verification of a whole audit log against signed checkpoints (pure).

Input: the entries in log order, each with the leaf hash the log stored beside it (a hint,
never trusted), the checkpoint notes the log holds, the log's verifier key, and checkpoints
the caller kept (a device's or an operator's witness copy). Output: a :class:`Report` whose
findings say what is wrong and from which index.

What is found, and how precisely::

    audit.entry.malformed      entry i is not a canonical v1 entry             index i
    audit.entry.out_of_place   entry i says seq j != i (deleted, reordered,    index i
                               inserted or duplicated entries)
    audit.entry.hash_mismatch  entry i no longer hashes to its stored leaf     index i
                               (edited in place)
    audit.root.mismatch        the entries do not hash to a signed root        first index
                               (rewritten, hashes and all): between the last   in [start, end)
                               checkpoint that matched and this one
    audit.truncated            a signed checkpoint covers more entries than    index = size
                               the log holds
    audit.checkpoint.*         a checkpoint note is malformed, mis-signed, or of another log
    audit.fork                 two signed checkpoints of one size disagree

:attr:`Report.first_bad_index` is the earliest index at which the log stops being the one
the checkpoints commit to (for a root mismatch, the start of the narrowest range known).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from edgeward_shared.audit.entry import decode_entry
from edgeward_shared.audit.merkle import EMPTY_ROOT, CompactRange, leaf_hash
from edgeward_shared.audit.note import Checkpoint, NoteReason, NoteVerifier, open_checkpoint
from edgeward_shared.errors import EdgewardError


class VerifyReason:
    """Reason ids of offline verification (stable; docs/protocol.md 5)."""

    MALFORMED: Final = "audit.entry.malformed"
    OUT_OF_PLACE: Final = "audit.entry.out_of_place"
    HASH_MISMATCH: Final = "audit.entry.hash_mismatch"
    ROOT_MISMATCH: Final = "audit.root.mismatch"
    TRUNCATED: Final = "audit.truncated"
    FORK: Final = "audit.fork"


@dataclass(frozen=True, slots=True)
class Finding:
    reason: str
    index: int | None  # the first bad index (None: not about an entry)
    end: int | None = None  # for a range: the bad index is in [index, end)
    detail: str = ""


@dataclass(slots=True)
class Report:
    size: int = 0
    verified_size: int = 0  # entries covered by a checkpoint that matched
    checkpoints: int = 0  # signed checkpoints checked
    latest: Checkpoint | None = None
    findings: list[Finding] = field(default_factory=list)
    leaves: list[bytes] = field(default_factory=list)  # recomputed, for proofs

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def first_bad_index(self) -> int | None:
        exact = [f.index for f in self.findings if f.index is not None and f.end is None]
        ranges = [f for f in self.findings if f.index is not None and f.end is not None]
        first_range = min(ranges, key=lambda f: f.index or 0, default=None)
        if exact and (first_range is None or min(exact) < (first_range.end or 0)):
            return min(exact)
        return first_range.index if first_range is not None else None


def verify_log(
    entries: Iterable[tuple[bytes, bytes | None]],
    notes: Sequence[str],
    verifier: NoteVerifier,
    *,
    origin: str,
    trusted: Sequence[Checkpoint] = (),
    keep_leaves: bool = False,
) -> Report:
    """Check every entry, every checkpoint note, and the ``trusted`` checkpoints."""
    report = Report()
    roots: dict[int, bytes] = {}
    trusted_sizes: set[int] = set()
    for checkpoint in trusted:  # first, so that a fork is judged against the witness's root
        if checkpoint.origin != origin:
            report.findings.append(Finding(NoteReason.ORIGIN, None, detail=checkpoint.origin))
        else:
            _add_root(report, roots, checkpoint)
            trusted_sizes.add(checkpoint.size)
    for note in notes:
        try:
            checkpoint = open_checkpoint(note, verifier, origin=origin)
        except EdgewardError as exc:
            report.findings.append(Finding(exc.reason, None, detail=exc.detail))
            continue
        _add_root(report, roots, checkpoint)
    # A fork means the log's key signed two histories: its own checkpoints no longer narrow
    # down where the log went wrong, only the witnesses' do.
    forked = any(f.reason == VerifyReason.FORK for f in report.findings)
    walk = _Walk(report, roots, trusted_sizes, forked=forked, keep_leaves=keep_leaves)
    for index, (raw, stored) in enumerate(entries):
        walk.entry(index, raw, stored)
    report.size = walk.edge.size
    report.verified_size = walk.matched
    beyond = [size for size in roots if size > walk.edge.size]
    if beyond:
        report.findings.append(
            Finding(
                VerifyReason.TRUNCATED,
                walk.edge.size,
                detail=f"a signed checkpoint covers {max(beyond)} entries; the log has"
                f" {walk.edge.size}",
            )
        )
    return report


class _Walk:
    """The streaming pass over the entries: one finding per kind, the first one."""

    def __init__(
        self,
        report: Report,
        roots: dict[int, bytes],
        trusted: set[int],
        *,
        forked: bool,
        keep_leaves: bool,
    ) -> None:
        self.report = report
        self.roots = roots
        self.trusted = trusted
        self.forked = forked
        self.matched_trusted = 0
        self.keep_leaves = keep_leaves
        self.edge = CompactRange()
        self.matched = 0
        self.seen: set[str] = set()
        if roots.get(0, EMPTY_ROOT) != EMPTY_ROOT:
            self.once(Finding(VerifyReason.ROOT_MISMATCH, 0, 0, "the empty tree"))

    def once(self, finding: Finding) -> None:
        if finding.reason not in self.seen:
            self.seen.add(finding.reason)
            self.report.findings.append(finding)

    def entry(self, index: int, raw: bytes, stored: bytes | None) -> None:
        try:
            entry = decode_entry(raw)
        except ValueError as exc:
            self.once(Finding(VerifyReason.MALFORMED, index, detail=str(exc)))
        else:
            if entry.seq != index:
                self.once(Finding(VerifyReason.OUT_OF_PLACE, index, detail=f"seq {entry.seq}"))
        leaf = leaf_hash(raw)
        if stored is not None and stored != leaf:
            self.once(Finding(VerifyReason.HASH_MISMATCH, index))
        if self.keep_leaves:
            self.report.leaves.append(leaf)
        self.edge.append(leaf)
        expected = self.roots.get(self.edge.size)
        if expected is None:
            return
        if expected == self.edge.root():
            if VerifyReason.ROOT_MISMATCH not in self.seen:
                self.matched = self.edge.size
                if self.edge.size in self.trusted:
                    self.matched_trusted = self.edge.size
            return
        # A witness's root that the log's entries miss, or a log key that signed two
        # histories: the log's own checkpoints no longer say where it went wrong.
        doubt = self.forked or self.edge.size in self.trusted
        self.once(
            Finding(
                VerifyReason.ROOT_MISMATCH,
                self.matched_trusted if doubt else self.matched,
                self.edge.size,
                f"entries do not hash to the signed root of size {self.edge.size}",
            )
        )


def _add_root(report: Report, roots: dict[int, bytes], checkpoint: Checkpoint) -> None:
    report.checkpoints += 1
    known = roots.setdefault(checkpoint.size, checkpoint.root)
    if known != checkpoint.root:
        report.findings.append(
            Finding(VerifyReason.FORK, None, detail=f"two roots for size {checkpoint.size}")
        )
    if report.latest is None or checkpoint.size > report.latest.size:
        report.latest = checkpoint
