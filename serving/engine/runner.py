"""ModelRunner: one forward pass over the scheduled chunks as a single flat ragged batch."""

from __future__ import annotations

import logging

import torch

from serving.engine import lean_forward as lean
from serving.engine import native_decode as native
from serving.engine.decode_mirror import DecodeMirror
from serving.engine.kv_cache import BlockManager
from serving.engine.linear_kernels import EngineLinears
from serving.engine.paged_attention import (
    PAGED_ATTENTION,
    PagedBatch,
    PagedKVStore,
    build_group,
    native_attention_available,
    register_paged_attention,
)
from serving.engine.request import Request
from serving.engine.scheduler import ScheduledChunk
from visualchat.model.modeling import VisualChatModel

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        model: VisualChatModel,
        blocks: BlockManager,
        linear_kernels: str | None = "auto",
        lean_forward: bool = True,
        decode_mirror_tokens: int = 0,
        block_kernels: bool = True,
        native_decode: bool = True,
        native_attention: bool = True,
    ) -> None:
        self.model = model
        self.blocks = blocks
        self.mmca = model.config.attention == "mmca"
        lm_config = model.language_model.config
        if getattr(lm_config, "sliding_window", None) and getattr(
            lm_config, "use_sliding_window", True
        ):
            logger.warning(
                "the engine attends over the whole context; %s's sliding window is ignored",
                lm_config.model_type,
            )
        num_heads = lm_config.num_attention_heads
        head_dim = getattr(lm_config, "head_dim", None) or lm_config.hidden_size // num_heads
        num_kv_heads = getattr(lm_config, "num_key_value_heads", None) or num_heads
        self.shared_heads = num_heads // num_kv_heads  # query heads per kv head
        self.store = PagedKVStore(
            num_layers=lm_config.num_hidden_layers,
            num_slots=blocks.num_blocks * blocks.block_size,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            dtype=model.dtype,
            device=model.device,
        )
        self.mirror = DecodeMirror(lm_config.num_hidden_layers, decode_mirror_tokens)
        # Decode groups of the other passes (too many rows for the native pass, or beside a
        # prompt chunk) attend natively from the slots where they can (see paged_attention);
        # the mirror then has nothing to hold.
        self.native_attention = native_attention and native_attention_available(self.store)
        # The runner borrows the model: it switches the backbone to paged attention for its
        # lifetime and `release` gives the model back with the attention it came with.
        self.model_attention = model.config.attention
        register_paged_attention()
        model.language_model.set_attn_implementation(PAGED_ATTENTION)
        # Llama-family backbones run the engine's own flat forward (see lean_forward); any other
        # goes through transformers' modules, with the paged attention plugged in.
        reason = lean.supports(model.language_model) if lean_forward else "turned off"
        if reason is not None and lean_forward:
            logger.info("transformers' forward runs the backbone: %s", reason)
        # On CPU the linear layers run the kernels fastest on this machine for each pass size
        # (see linear_kernels); release gives the layers their own forwards back too. The lean
        # forward multiplies through the stacked products itself, so it keeps them.
        self.linears = (
            EngineLinears(
                model.language_model,
                torch.get_num_threads(),
                linear_kernels,
                give_back=reason is not None,
                blocks=block_kernels,
            )
            if linear_kernels is not None and model.device.type == "cpu"
            else None
        )
        self.lean = lean.LeanForward(model.language_model) if reason is None else None
        # Decode-only passes through the native decode pass (see native_decode), where it can.
        self.native = None
        if self.lean is not None and native_decode:
            why_not = native.supports(self.lean, self.store)
            if why_not is None:
                self.native = native.NativeDecode(self.lean, self.store, self.mmca)
            else:
                logger.info("decode passes run the lean forward: %s", why_not)

    def release(self) -> None:
        """Restore the model's own attention; the runner must not execute afterwards."""
        self.model.set_attention(self.model_attention)
        self.lean = self.native = None
        self.mirror.clear()
        if self.linears is not None:
            self.linears.release()
            self.linears = None

    def ensure_image_features(self, request: Request, encode) -> None:
        if request.image_features is None and request.inputs.num_images:
            request.image_features = encode(request)  # (num_images, tokens, hidden)

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Run the chunks; return logits (num_sampling_chunks, vocab) in chunk order."""
        device = self.model.device
        token_ids: list[int] = []
        positions: list[int] = []
        tags: list[int] = []
        slots: list[int] = []
        image_rows: list[tuple[int, Request, int, int]] = []  # (row, request, image, offset)
        decode_group: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        decode_ids: list[str] = []
        prefill_groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        sample_rows: list[int] = []
        for chunk in chunks:
            request = chunk.request
            first_row = len(token_ids)
            span_starts = {s.image_index + 1: s.start for s in request.inputs.image_spans}
            for position in range(chunk.start, chunk.start + chunk.num_tokens):
                tag = request.modality_at(position)
                if tag > 0:
                    image_rows.append(
                        (len(token_ids), request, tag - 1, position - span_starts[tag])
                    )
                token_ids.append(request.token_id_at(position))
                positions.append(position)
                tags.append(tag)
            end = chunk.start + chunk.num_tokens
            key_slots = self.blocks.slots(request.block_table, 0, end)  # (end,)
            slots.extend(key_slots[chunk.start :].tolist())
            rows = torch.arange(first_row, len(token_ids))
            entry = (rows, torch.arange(chunk.start, end), key_slots)
            if chunk.num_tokens == 1:
                decode_group.append(entry)
                decode_ids.append(request.request_id)
            else:
                prefill_groups.append(entry)
            if chunk.samples:
                sample_rows.append(len(token_ids) - 1)
        new_slots = torch.tensor(slots, device=device)
        self.store.tags[new_slots] = torch.tensor(tags, device=device)
        positions_t = torch.tensor(positions, device=device)  # (num_tokens,)
        sample_rows_t = torch.tensor(sample_rows, dtype=torch.long, device=device)
        if self.native is not None and not prefill_groups and self.native.takes(len(token_ids)):
            # The native pass reads the keys from their slots, not from the decode mirror, so
            # the mirror holds no copies while it runs (they would be stale: a later mirrored
            # pass finds its members more than one position on, and gathers afresh).
            self.mirror.clear()
            key_slots = torch.nn.utils.rnn.pad_sequence(
                [s for _, _, s in decode_group], batch_first=True
            )  # (m, longest context)
            embeds = self._embed(token_ids, tags, image_rows)  # (m, hidden)
            hidden = self.native(embeds, positions_t, new_slots, key_slots)
            return self.lean.logits(hidden, sample_rows_t)
        batch = PagedBatch(store=self.store, new_slots=new_slots, mmca=self.mmca)
        if decode_group:
            group = self._group(decode_group, native=self.native_attention)
            if group.native_parts is not None:
                self.mirror.clear()
            elif self.mirror.plan(tuple(decode_ids), [slots for _, _, slots in decode_group]):
                group.mirror = self.mirror
            batch.groups.append(group)
        else:
            self.mirror.clear()  # nothing decodes: hold no copies
        for entry in prefill_groups:
            batch.groups.append(self._group([entry]))
        embeds = self._embed(token_ids, tags, image_rows)  # (num_tokens, hidden)
        if self.lean is not None:
            return self.lean(embeds, positions_t, batch, sample_rows_t)
        out = self.model.language_model(
            inputs_embeds=embeds.unsqueeze(0),
            position_ids=positions_t.unsqueeze(0),
            use_cache=False,
            logits_to_keep=sample_rows_t,
            paged_batch=batch,
        )
        return out.logits[0]  # (num_sampling_chunks, vocab)

    def _group(self, entries, native: bool = False) -> object:
        rows, positions, key_slots = zip(*entries, strict=True)
        device = self.model.device
        return build_group(
            self.store,
            [r.to(device) for r in rows],
            [p.to(device) for p in positions],
            [s.to(device) for s in key_slots],
            self.mmca,
            self.shared_heads,
            native,
        )

    def _embed(
        self, token_ids: list[int], tags: list[int], image_rows: list[tuple[int, Request, int, int]]
    ) -> torch.Tensor:
        device = self.model.device
        ids = torch.tensor(token_ids, device=device)
        is_image = torch.tensor(tags, device=device) > 0
        ids = ids.masked_fill(is_image, self.model.config.image_token_id)
        embeds = self.model.language_model.get_input_embeddings()(ids)  # (num_tokens, hidden)
        if image_rows:
            rows = torch.tensor([r for r, _, _, _ in image_rows], device=device)
            feats = torch.stack(
                [req.image_features[image, offset] for _, req, image, offset in image_rows]
            )  # (num_image_rows, hidden)
            numbers = torch.tensor([image + 1 for _, _, image, _ in image_rows], device=device)
            feats = self.model.projector.add_image_index(feats.to(embeds.dtype), numbers)
            embeds[rows] = feats
        return embeds
