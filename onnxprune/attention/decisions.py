"""What head removal decided per block, as the report and --report show it."""

from __future__ import annotations

from dataclasses import dataclass, replace

from onnxprune.attention.block import AttentionBlock
from onnxprune.attention.granularity import Choice

__all__ = ["HeadDecision", "RemoveHeadsResult", "described"]


@dataclass(frozen=True)
class HeadDecision:
    block: str
    kind: str
    heads_before: int
    heads_after: int
    head_size: int | None
    removed: tuple[int, ...] = ()
    reason: str | None = None
    # "heads" (multi-head), "kv-groups" (heads_* count K/V groups) or "query-heads" (heads_*
    # count query heads, thinned alike in every group); query and K/V head counts after
    granularity: str = "heads"
    query_heads: tuple[int, int] | None = None  # (before, after)
    kv_heads: tuple[int, int] | None = None
    note: str | None = None  # why less than asked, or why the other unit

    def to_dict(self) -> dict[str, object]:
        d = dict(vars(self))
        d["removed"] = list(self.removed)
        return d


@dataclass(frozen=True)
class RemoveHeadsResult:
    criterion: str
    blocks: tuple[HeadDecision, ...]

    @property
    def removed(self) -> int:
        """Units removed: heads, K/V groups or thinned query heads."""
        return sum(b.heads_before - b.heads_after for b in self.blocks)

    def to_dict(self) -> dict[str, object]:
        return {
            "criterion": self.criterion,
            "removed_heads": self.removed,
            "blocks": [b.to_dict() for b in self.blocks],
            "notes": [f"{b.block}: {b.note}" for b in self.blocks if b.note],
        }


def described(d: HeadDecision, block: AttentionBlock, choice: Choice) -> HeadDecision:
    """Adds the granularity, query and K/V head counts and the note to a decision; the
    note becomes the reason where the block changed (a reason on an unchanged block would
    read as a decline)."""
    if block.projections and d.reason is None:
        thin = d.granularity == "query-heads" or choice.granularity == "query-heads" and \
            d.heads_after < d.heads_before
        gran = "query-heads" if thin else choice.granularity
        if thin:
            q, kv = (d.heads_before, d.heads_after), (block.num_heads, block.num_heads)
        else:
            g = block.group
            q, kv = (d.heads_before * g, d.heads_after * g), (d.heads_before, d.heads_after)
        changed = d.heads_after < d.heads_before
        return replace(d, granularity=gran, query_heads=q, kv_heads=kv, note=choice.note,
                       reason=choice.note if changed else None)
    return d
