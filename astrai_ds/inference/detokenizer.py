"""Streaming token ids to text: never half a character, never a stop string or text that could start one.

Byte-level BPE splits a Chinese character (3 UTF-8 bytes) or an emoji (4) across tokens, so a token alone
is often not text; the `tokenizers` stream decoder gives text only once the characters are complete. On top
of that, text that might be the beginning of a stop string is held back until it is clearly not one.

"The first stop string" is the first to be complete as the text grows: the occurrence that ends earliest,
and of those ending at the same place the longest. That depends on the text alone, not on where the token
boundaries fall, so the result equals `tokenizer.decode(all_ids)` cut there.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    """Feed one generated token at a time with `add`; call `finish` when generation ends."""

    def __init__(self, tokenizer, stop: list[str] = (), skip_special_tokens: bool = True):
        self._tokenizer = tokenizer  # astrai_ds.data.tokenizer.Tokenizer
        self._step = tokenizer.decode_stream(skip_special_tokens=skip_special_tokens)
        self._skip_special = skip_special_tokens
        self._stop = [stop] if isinstance(stop, str) else list(stop)
        self._pending_ids: list[int] = []  # ids the stream decoder has not turned into text yet
        self._held = ""  # decoded text held back because it could be the start of a stop string
        self._stopped = False
        self.matched_stop: str | None = None  # the stop string that ended the text, once `stopped`

    @property
    def stopped(self) -> bool:
        """A stop string appeared: the text was cut just before it and nothing more is emitted."""
        return self._stopped

    def add(self, token_id: int) -> str:
        """Take the next token; return the text that is now safe to emit (may be "")."""
        if self._stopped:
            return ""
        self._pending_ids.append(int(token_id))
        new = self._step(token_id)
        if new is None:  # the token ends inside a character
            return ""
        self._pending_ids.clear()
        return self._emit(self._held + new, final=False)

    def finish(self) -> str:
        """At the end of generation: emit what was held back, now real text since no more can follow.

        Tokens that never completed a character (only possible when the model emitted an invalid byte
        sequence) decode with U+FFFD, as `tokenizer.decode` renders them."""
        if self._stopped:
            return ""
        tail = self._tokenizer.decode(self._pending_ids, skip_special_tokens=self._skip_special)
        self._pending_ids.clear()
        return self._emit(self._held + tail, final=True)

    def _emit(self, buf: str, final: bool) -> str:
        # `buf` = held text + new text. The held part holds no whole stop string (it was searched before), so
        # any occurrence found here ends in the new text.
        hits = [(i + len(s), i) for s in self._stop if (i := buf.find(s)) >= 0]
        if hits:
            end, cut = min(hits)  # ends first; of those, starts first (the longest)
            out, self._held, self._stopped = buf[:cut], "", True
            self.matched_stop = buf[cut:end]
        else:
            keep = 0 if final else self._partial_stop_len(buf)
            out, self._held = buf[:len(buf) - keep], buf[len(buf) - keep:]
        return out

    def _partial_stop_len(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop string."""
        longest = max((len(s) for s in self._stop), default=1) - 1
        for n in range(min(longest, len(buf)), 0, -1):
            if any(s.startswith(buf[-n:]) for s in self._stop):
                return n
        return 0
