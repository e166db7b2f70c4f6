"""Token ids -> streamed text deltas that never split a character and never leak a stop string.

Byte-level BPE tokens can end inside a multi-byte UTF-8 character; decoding such a prefix gives
U+FFFD, so a delta ending in it is held back until the character completes. Text that could be
the beginning of a stop string is held back too, so a stop string never reaches the client.

Each token decodes only a short window of recent ids (the prefix-offset scheme of vLLM and TGI):
decode(ids[prefix:]) minus decode(ids[prefix:read]) is the new text, so a token costs the same
at the end of a 4,000-token reply as at its start instead of re-decoding the whole reply.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDecoder:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.text = ""  # the decoded reply so far (stop strings cut off, partial characters not)
        self.num_emitted = 0  # characters of self.text already handed out
        self.is_stopped = False  # a stop string was seen
        # token_ids[prefix:read] is the window whose text is already in self.text; decoding from
        # `prefix` (not from `read`) lets tokens that merge with their predecessor decode right.
        self._prefix = 0
        self._read = 0

    def add(self, token_id: int) -> str:
        """Append one token; return the newly safe text (maybe empty)."""
        if self.is_stopped:
            return ""
        self.token_ids.append(token_id)
        new = self._new_text()
        text = self.text + new
        stop_at = self._find_stop(text)
        if stop_at is not None:
            self.text, self.is_stopped = text[:stop_at], True
            return self._emit(len(self.text))
        self.text = text
        safe_end = len(text) - self._partial_stop_length(text)
        return self._emit(max(safe_end, self.num_emitted))

    def flush(self) -> str:
        """At the end of generation: hand out whatever was held back (an unfinished character
        comes out as U+FFFD, as a full decode would show it)."""
        if not self.is_stopped and self._read < len(self.token_ids):
            window = self._decode(self._prefix, len(self.token_ids))
            self.text += window[len(self._decode(self._prefix, self._read)) :]
            self._read = len(self.token_ids)
            stop_at = self._find_stop(self.text)
            if stop_at is not None:
                self.text, self.is_stopped = self.text[:stop_at], True
        return self._emit(len(self.text))

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.token_ids[start:end], skip_special_tokens=True)

    def _new_text(self) -> str:
        """Text the newest tokens complete; "" while they end inside a UTF-8 character."""
        prefix_text = self._decode(self._prefix, self._read)
        window = self._decode(self._prefix, len(self.token_ids))
        if len(window) <= len(prefix_text) or window.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix, self._read = self._read, len(self.token_ids)
        return window[len(prefix_text) :]

    def _emit(self, end: int) -> str:
        delta = self.text[self.num_emitted : end]
        self.num_emitted = max(self.num_emitted, end)
        return delta

    def _find_stop(self, text: str) -> int | None:
        # Search only where a new match can start: a stop string may straddle the last delta.
        window = max((len(s) for s in self.stop), default=0)
        start = max(0, self.num_emitted - window)
        hits = [i for s in self.stop if (i := text.find(s, start)) != -1]
        return min(hits) if hits else None

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
