"""The decode group's keys and values kept gathered between steps, appended to in place.

Why. Attention over the paged cache first gathers every sequence's cached keys and values from
their slots into one padded (sequences, positions, kv_heads, head_dim) batch for SDPA, in every
layer of every step. On CPU that copy is not free: it moves each position twice more than the
attention reads it (a read and a write, then SDPA's read), and for decode steps it is most of
the attention's cost once contexts grow. Measured on the embedded default (host B), 8
sequences at 320 cached positions spent 9.8 ms of an 83 ms decode step in the gathers and 7.3 ms
in SDPA; one sequence at 1,520 positions, 6.7 and 6.6 ms of a 50 ms step. Yet from one decode
step to the next the batch changes by one position per sequence.

What. While the decode group keeps the same sequences in the same order, each of them one
position further, the runner keeps its gathered keys and values (one tensor of each per layer,
with room for `HEADROOM` more positions) and writes only the new position of each sequence
into them; SDPA reads a view of the first `num_keys` positions. Any other change (a sequence
joins, finishes, is preempted or aborted, skips a step, or outgrows the room) gathers again,
as before, into a fresh batch with room to grow. The paged cache stays the store of record:
every key is still written to its slot, and a gather reads from there, so the mirror only ever
holds copies of what the cache holds. Positions past a sequence's end hold whatever the
gather or an earlier step left there; the masks hide them (-inf), so they never count.

The values are the same numbers in the same layout as a fresh gather, so attention's results
are the gather path's to the bit (tested). The cost is memory: the decode group's cached
positions once more, at most `max_tokens` positions (sequences x room) across all layers; a
group that needs more is gathered every step as before.

Where decode groups attend natively from the slots (`paged_attention.native_decode_attention`:
a CPU float32 cache and the native library built) nothing is gathered and the mirror stays
empty; it serves the gather path elsewhere (other devices and dtypes, no compiler).
"""

from __future__ import annotations

import torch

# Positions of room each sequence gets beyond its current length at a gather: the group is
# gathered again at least every HEADROOM steps (two 16-slot blocks; the gather is then ~1/32
# of what it was).
HEADROOM = 32


class DecodeMirror:
    """The current decode group's keys and values per layer, (b, room, kv_heads, head_dim): the
    cache's own slot-major layout, so a gather is one contiguous `index_select`. A head-major
    copy took 1.2-1.8x as long to make, or 4.0-4.7x gathered along a permuted view, and SDPA
    read it no faster (host B, `benchmarks/mirror_layout.py`)."""

    def __init__(self, num_layers: int, max_tokens: int) -> None:
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be non-negative, got {max_tokens}")
        self.max_tokens = max_tokens
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.members: tuple[str, ...] = ()  # request ids, in group order
        self.lengths: list[int] = []  # cached positions of each member the mirror holds
        self.room = 0  # positions per member
        self.gather_slots: torch.Tensor | None = None  # (b * room,) set when this pass gathers
        # (b,) rows of the flattened (b * room, kv_heads, d) mirror that this pass's keys go to,
        # set when it appends: member i's new position p_i at i * room + p_i
        self.append_at: torch.Tensor | None = None
        self.num_gathers = 0  # passes that gathered (counted for the tests)
        self.num_appends = 0  # passes that appended

    def plan(self, members: tuple[str, ...], key_slots: list[torch.Tensor]) -> bool:
        """Decide how this pass's decode group gets its keys; False: not mirrored (too large or
        empty), so the attention gathers as usual. key_slots: per member, the slots of its
        positions 0..k-1 including this pass's new one."""
        lengths = [len(s) for s in key_slots]
        if not members or len(members) * (max(lengths) + HEADROOM) > self.max_tokens:
            self.clear()
            return False
        if (
            members == self.members
            and all(new == old + 1 for new, old in zip(lengths, self.lengths, strict=True))
            and max(lengths) <= self.room
        ):
            positions = torch.tensor(lengths) - 1
            rows = torch.arange(len(members)) * self.room + positions
            self.append_at = rows.to(key_slots[0].device)
            self.gather_slots = None
            self.num_appends += 1
        else:
            self.room = max(lengths) + HEADROOM
            padded = torch.zeros(len(members), self.room, dtype=torch.long)
            for i, slots in enumerate(key_slots):
                padded[i, : len(slots)] = slots  # past the end: slot 0, masked
            self.gather_slots = padded.view(-1).to(key_slots[0].device)
            self.append_at = None
            self.members = members
            self.num_gathers += 1
        self.lengths = lengths
        return True

    def keys_values(
        self,
        layer: int,
        cache_keys: torch.Tensor,  # (slots, kv_heads, d) the layer's paged store
        cache_values: torch.Tensor,
        new_keys: torch.Tensor,  # (b, kv_heads, d) this pass's key of each member, in order
        new_values: torch.Tensor,
        num_keys: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, kv_heads, num_keys, d) views of the group's keys and values for this layer."""
        b = len(self.members)
        if self.gather_slots is not None:
            shape = (b, self.room, *cache_keys.shape[1:])  # (b, room, kv_heads, d)
            self.keys[layer] = cache_keys.index_select(0, self.gather_slots).view(shape)
            self.values[layer] = cache_values.index_select(0, self.gather_slots).view(shape)
        else:
            for new, held in ((new_keys, self.keys), (new_values, self.values)):
                held[layer].view(-1, *new.shape[1:]).index_copy_(0, self.append_at, new)
        keys, values = self.keys[layer], self.values[layer]
        return keys[:, :num_keys].transpose(1, 2), values[:, :num_keys].transpose(1, 2)

    def clear(self) -> None:
        """Hold nothing: the next mirrored group gathers."""
        self.keys = [None] * len(self.keys)
        self.values = [None] * len(self.values)
        self.members, self.lengths, self.room = (), [], 0
        self.gather_slots = self.append_at = None

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)
