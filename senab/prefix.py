"""Prompt prefixes computed once below the bridge and reused across requests.

The decoder layers below the bridge (0 .. L-m-1) depend only on the tokens: not on the
session vector, not on the bridge. So their keys and values for a prompt's first P tokens
are the same for every request whose prompt starts with those tokens. Such prefixes are
the chat template's system prompt and the earlier turns of a conversation, which the
client sends again. `PrefixCache` keeps, per prefix, those layers' keys and values and the hidden state
that enters layer L-m, in a least-recently-used store bounded in bytes.

`PrefixPrefill` runs a prompt whose start is cached: the lower layers over the rest of the
prompt only, attending to the cached keys and values, then the bridged layers over the
whole prompt, because the automaton reads every position in. It returns the KV cache in
the left-padded layout of a plain prefill, so the batch decodes it as any other. The result
equals the plain prefill up to float rounding (in bfloat16 the padding and the number of
positions per call change the rounding, as they do between plain prefills).

A prefix is cached at the start of the prompt's current turn (`GenerationRequest.turn_start`):
the template and earlier turns, never the new user message. Rows share prefixes only with
rows of the same `cache_salt`; the server passes the caller's tenant, so that no tenant can
learn from a fast first token that another one sent a prompt.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from senab.kvcache import new_kv_cache

logger = logging.getLogger(__name__)

# Below this a hit saves little (an estimate, not measured), while prompts admitted together
# still split into one prefill call per prefix length. SmolLM2's default system prompt is 24 tokens.
MIN_PREFIX_TOKENS = 16


@dataclass
class PrefixEntry:
    """One cached prefix: its tokens, the lower layers' keys and values, and the hidden state above them."""

    salt: str
    ids: tuple[int, ...]
    keys: list[torch.Tensor]  # per lower layer, (KV heads, P, head dim)
    values: list[torch.Tensor]
    hidden: torch.Tensor  # (P, hidden size), the input of the first layer above

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values, self.hidden))


@dataclass
class PrefixStats:
    """Counts since start: prompt tokens looked up, of them found cached, and entries evicted."""

    query_tokens: int = 0
    hit_tokens: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0


class PrefixCache:
    """A least-recently-used store of `PrefixEntry`, at most `max_bytes` in all.

    `fingerprint` identifies the weights the entries were computed with; `check` drops every
    entry when it changes (weights loaded or cast since).
    """

    def __init__(self, max_bytes: int, min_tokens: int = MIN_PREFIX_TOKENS) -> None:
        if max_bytes < 0:
            raise ValueError(f"Invalid prefix cache size of {max_bytes} bytes; pass 0 to switch it off, or more")
        if min_tokens < 1:
            raise ValueError(f"Invalid min_tokens {min_tokens}; pass 1 or more")
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self._entries: OrderedDict[tuple[str, tuple[int, ...]], PrefixEntry] = OrderedDict()
        self._bytes = 0
        self._fingerprint: tuple | None = None
        self._logged_too_large = False
        self.stats = PrefixStats()

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, fingerprint: tuple) -> None:
        """Drop every entry if `fingerprint` differs from the one the entries were computed with."""
        if fingerprint != self._fingerprint:
            if self._entries:
                logger.info("prefix cache cleared: the model's weights changed since its %d entries were computed",
                            len(self._entries))
            self.clear()
            self._fingerprint = fingerprint

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0
        self._update_stats()

    def lookup(self, salt: str, prompt_ids: list[int], limit: int) -> PrefixEntry | None:
        """Return the longest entry of `salt` whose tokens start `prompt_ids[:limit]`, or None, and count the query."""
        self.stats.query_tokens += len(prompt_ids)
        best = None
        for (entry_salt, ids), entry in self._entries.items():
            if (entry_salt == salt and len(ids) <= limit and (best is None or len(ids) > best.length)
                    and tuple(prompt_ids[:len(ids)]) == ids):
                best = entry
        if best is not None:
            self._entries.move_to_end((salt, best.ids))
            self.stats.hit_tokens += best.length
        return best

    def wants(self, salt: str, prompt_ids: list[int], turn_start: int) -> bool:
        """Return whether the prefix before `turn_start` is long enough and not cached yet."""
        return (self.max_bytes > 0 and self.min_tokens <= turn_start < len(prompt_ids)
                and (salt, tuple(prompt_ids[:turn_start])) not in self._entries)

    def insert(self, entry: PrefixEntry) -> None:
        """Add `entry` and evict the least recently used entries beyond `max_bytes` (skip an entry larger than that)."""
        size = entry.nbytes
        key = (entry.salt, entry.ids)
        if size > self.max_bytes:
            if not self._logged_too_large:
                self._logged_too_large = True
                logger.info("a prompt prefix of %d tokens (%.1f MiB) is larger than the prefix cache (%.1f MiB) and "
                            "is not cached; a larger cache would keep such prefixes (logged once)",
                            entry.length, size / 2 ** 20, self.max_bytes / 2 ** 20)
            return
        if key in self._entries:
            return
        self._entries[key] = entry
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.nbytes
            self.stats.evictions += 1
        self._update_stats()

    def _update_stats(self) -> None:
        self.stats.entries = len(self._entries)
        self.stats.bytes = self._bytes


class PrefixPrefill:
    """Prefills of a Llama-family model that start from cached prefixes.

    `boundary` is the index of the first layer whose keys and values depend on more than
    the tokens: the bridge's first layer, or the number of layers without a bridge.
    """

    def __init__(self, model: nn.Module, boundary: int) -> None:
        self.model = model
        self.inner = model.model
        self.layers = list(self.inner.layers[: model.config.num_hidden_layers])
        if not 0 < boundary <= len(self.layers):
            raise ValueError(f"Invalid boundary layer {boundary}; pass 1 to {len(self.layers)}")
        self.boundary = boundary

    def blocker(self) -> str | None:
        """Return why prefixes cannot be reused on the model as it is now, or None when they can.

        Reusing a prefix skips the forward calls of the model and of the lower layers for
        its tokens, so hooks there would not see them. Forward pre-hooks on the layers from
        the boundary up (the bridge's read-in) still run.
        """
        if self.model.config._attn_implementation != "sdpa":
            return f"attention {self.model.config._attn_implementation!r} is not sdpa"
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return "global module hooks are registered"
        # The layers from the boundary up and the output layer get the same calls as in the
        # model's forward call, so their hooks may stay.
        called_alike = {id(module) for root in (*self.layers[self.boundary:], self.model.lm_head)
                        for module in root.modules()}
        for name, module in self.model.named_modules():
            if (module._forward_hooks or module._forward_pre_hooks) and id(module) not in called_alike:
                return f"{name or 'the model'} has forward hooks"
        return None

    def fingerprint(self) -> tuple:
        """Identify the lower layers' and the embedding's tensors and their in-place versions."""
        modules = [self.inner.embed_tokens, self.inner.rotary_emb, *self.layers[: self.boundary]]
        return tuple((id(t), t._version, t.dtype) for module in modules
                     for t in (*module.parameters(), *module.buffers()))

    @contextlib.contextmanager
    def capture(self, captured: list[torch.Tensor]) -> Iterator[None]:
        """Append the hidden states that enter the boundary during the block to `captured` ((B, T, d) per call)."""
        target = self.layers[self.boundary] if self.boundary < len(self.layers) else self.inner.norm

        def hook(module, args, kwargs):
            captured.append(args[0] if args else kwargs["hidden_states"])

        handle = target.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def entries(self, cache: DynamicCache, hidden: torch.Tensor, attention_mask: torch.Tensor,
                rows: list[tuple[int, str, list[int], int]]) -> list[PrefixEntry]:
        """Cut the entries of `rows` (row, salt, prompt, prefix length) out of a finished prefill.

        `cache`, `hidden` (B, T, d) at the boundary and `attention_mask` (B, T) are in the
        left-padded layout of a prefill.
        """
        entries = []
        for row, salt, prompt, length in rows:
            start = int(attention_mask.shape[1] - attention_mask[row].sum())
            window = slice(start, start + length)
            # Contiguous copies, so that an entry holds no reference to the batch's buffers.
            keys = [cache.layers[i].keys[row, :, window].clone(memory_format=torch.contiguous_format)
                    for i in range(self.boundary)]
            values = [cache.layers[i].values[row, :, window].clone(memory_format=torch.contiguous_format)
                      for i in range(self.boundary)]
            entries.append(PrefixEntry(salt, tuple(prompt[:length]), keys, values,
                                       hidden[row, window].clone(memory_format=torch.contiguous_format)))
        return entries

    def __call__(self, entries: list[PrefixEntry], suffixes: list[list[int]], pad_token_id: int
                 ) -> tuple[torch.Tensor, DynamicCache, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefill rows whose prompts are `entries[i]`'s tokens followed by `suffixes[i]`.

        Every entry has the same length P. Returns the (B, V) logits of each row's last
        position, the KV cache and (B, W) attention mask and position ids in the left-padded
        layout of a plain prefill (W = P + the longest suffix), and the (B, W, d) hidden
        states that entered the boundary. Run it inside the bridge's `activate`, with the
        state's `valid` set to the returned mask (see `Generator`).
        """
        length = entries[0].length
        if any(entry.length != length for entry in entries):
            raise ValueError("every prefix of one prefill call must have the same length")
        if len(suffixes) != len(entries) or not all(suffixes):
            raise ValueError("pass one non-empty suffix per prefix")
        device = self.inner.embed_tokens.weight.device
        batch, width = len(entries), max(len(s) for s in suffixes)
        lengths = torch.tensor([len(s) for s in suffixes], device=device)
        pads = width - lengths  # (B,)

        # The lower layers, over the suffixes only: each row's keys and values are laid out
        # [prefix | its padding | its suffix], and padding is masked out of attention.
        suffix_ids = torch.full((batch, width), pad_token_id, dtype=torch.long, device=device)
        suffix_mask = torch.zeros((batch, width), dtype=torch.long, device=device)
        for row, suffix in enumerate(suffixes):
            suffix_ids[row, width - len(suffix):] = torch.tensor(suffix, dtype=torch.long, device=device)
            suffix_mask[row, width - len(suffix):] = 1
        lower_mask = torch.cat([suffix_mask.new_ones((batch, length)), suffix_mask], 1)
        lower_positions = length + (suffix_mask.cumsum(-1) - 1).clamp(min=0)
        lower = new_kv_cache(self.model.config)
        for index in range(self.boundary):
            lower.update(torch.stack([e.keys[index] for e in entries]),
                         torch.stack([e.values[index] for e in entries]), index)
        hidden = self.inner.embed_tokens(suffix_ids)
        mask = create_causal_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=lower_mask,
                                  cache=lower, position_ids=lower_positions)
        position_embeddings = self.inner.rotary_emb(hidden, position_ids=lower_positions)
        for layer in self.layers[: self.boundary]:
            hidden = layer(hidden, attention_mask=mask, position_ids=lower_positions, cache=lower, use_cache=True,
                           position_embeddings=position_embeddings)

        # Left-padded layout [padding | prefix | suffix]: slot t of row r takes slot
        # source[r, t] of the lower layout.
        total = length + width
        slots = torch.arange(total, device=device).unsqueeze(0)  # (1, W)
        pad = pads.unsqueeze(1)  # (B, 1)
        source = torch.where(slots < pad, length + slots, torch.where(slots < pad + length, slots - pad, slots))
        cache = new_kv_cache(self.model.config)
        for index in range(self.boundary):
            layer_cache = lower.layers[index]
            gather = source[:, None, :, None].expand(-1, layer_cache.keys.shape[1], -1, layer_cache.keys.shape[3])
            cache.update(layer_cache.keys.gather(2, gather), layer_cache.values.gather(2, gather), index)
        attention_mask = (slots >= pad).long().expand(batch, -1).contiguous()
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        boundary_hidden = hidden.new_zeros((batch, total, hidden.shape[-1]))
        for row, entry in enumerate(entries):
            start = int(pads[row])
            boundary_hidden[row, start:start + length] = entry.hidden
            boundary_hidden[row, start + length:] = hidden[row, width - len(suffixes[row]):]

        # The layers from the boundary up, over whole prompts, as in a plain prefill.
        hidden = boundary_hidden
        upper = self.layers[self.boundary:]
        if upper:
            mask = create_causal_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                      cache=new_kv_cache(self.model.config), position_ids=position_ids)
            position_embeddings = self.inner.rotary_emb(hidden, position_ids=position_ids)
            for layer in upper:
                hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True,
                               position_embeddings=position_embeddings)
        logits = self.model.lm_head(self.inner.norm(hidden[:, -1:]))[:, -1, :]
        return logits, cache, attention_mask, position_ids, boundary_hidden
