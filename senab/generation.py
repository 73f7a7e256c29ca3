"""Batched incremental decoding with the KV cache and the bridge's NCA cache.

`DecodeBatch` holds a running batch: requests join it after their prefill and leave it
when they finish, so a server can batch continuously. `Generator.stream` runs one fixed
batch through it. Each row has its own sampling settings, random generator, stop strings,
session vector and bridge switch, so one batch may mix sessions and the base model.
Text leaves the generator in increments that never split a UTF-8 character and never
contain any part of a stop string.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import numpy as np
import torch
from transformers import DynamicCache

from senab.bridge import BridgeHandle, BridgeState
from senab.fastdecode import LlamaDecodeStep
from senab.kvcache import new_kv_cache
from senab.prefix import PrefixCache, PrefixEntry, PrefixPrefill
from senab.quant import UNPACK_POSITIONS as LONG_PROMPT

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled"]
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request, with OpenAI's meanings and ranges."""

    max_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"Invalid top_p {self.top_p}: use a value from 0 to 1 (0 keeps only the most likely token)")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be between -2 and 2, got {getattr(self, name)}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        # Dividing logits by a temperature this small overflows float32, and the result
        # would be the argmax anyway.
        return self.temperature < GREEDY_BELOW_TEMPERATURE


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    # The row's session vector (C,) with the bridge on; None runs the base model.
    session: np.ndarray | None = None
    # Index of the first prompt token that belongs to the current turn (readout window).
    turn_start: int = 0
    # Rows share cached prompt prefixes only with rows of the same salt (a server passes the tenant).
    cache_salt: str = ""


@dataclass
class RowOutput:
    """One row's progress after a step: the new text and, once finished, the totals."""

    index: int
    text: str = ""
    finish_reason: FinishReason | None = None
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    readout: np.ndarray | None = None  # (C,), set when the row finishes with the bridge on


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting characters.

    Decoding a window that starts a few tokens back keeps tokenizers that merge spaces or
    bytes across tokens correct; a delta that ends in U+FFFD (an incomplete UTF-8 byte
    sequence) is held back until the next token completes it.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Return text still held back (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]


class StopMatcher:
    """Finds stop strings across token boundaries and holds back text that may start one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was found)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.pending[:min(hits)]
            self.pending = ""
            return out, True
        hold = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(stop[:length]):
                    hold = length
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def sample_next_token(logits: torch.Tensor, params: SamplingParams, generated: list[int],
                      generator: torch.Generator | None) -> int:
    """Pick the next token from one row's logits (V,) after penalties and truncation."""
    logits = logits.float()
    if generated and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(generated, device=logits.device), minlength=logits.shape[0])
        counts = counts[: logits.shape[0]].float()
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
    if params.greedy:
        return int(torch.argmax(logits).item())

    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[0]:
        threshold = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p. The most likely
        # token always stays, even for a top_p that rounds to 0 in float32.
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        drop[0] = False
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1).cpu()
    return inverse_cdf(probs, float(torch.rand((), generator=generator, dtype=torch.float64)))


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """Return the argmax of every row of (B, V) `logits`, the first index among equal maxima.

    The same tokens as `sample_next_token` picks for greedy rows without penalties. `max`
    in the logits' own dtype was the fastest way tried. For 16 rows of a 49K vocabulary in
    bfloat16 it took 0.38 ms on a 2-core Xeon, `argmax` after a cast to float32 0.74 ms and
    `argmax` in bfloat16 1.6 ms.
    """
    return logits.max(-1).indices.tolist()


def inverse_cdf(probs: torch.Tensor, uniform: float) -> int:
    """Return the token whose share of the cumulative sum of `probs` (V,) contains `uniform` in [0, 1).

    With `uniform` drawn uniformly, token i comes out with probability probs[i] / probs.sum(),
    and a token of probability 0 never does. `torch.multinomial` draws one exponential
    number per token instead: for a 49K vocabulary it took 1.8 ms per row against 0.13 ms
    for this on a 2-core AMD EPYC (torch 2.13), or 26 ms of every step of 16 sampled rows.
    """
    cumulative = torch.cumsum(probs, 0, dtype=torch.float64)
    total = float(cumulative[-1])
    if not math.isfinite(total) or total <= 0:
        # NaN or infinite logits end up here, and torch.multinomial raised on them as well.
        raise ValueError(f"Invalid token probabilities (sum {total}): the logits contain NaN or infinity; "
                         "check the model's weights and dtype")
    # The first token whose cumulative sum exceeds the target. Tokens of probability 0 add
    # nothing to the sum, so the token before them exceeds it first.
    index = int(torch.searchsorted(cumulative, uniform * total, right=True))
    if index < probs.shape[0]:
        return index
    # The product rounded up to the whole sum: take the last token that can come out.
    return int(torch.nonzero(probs)[-1])


class _Row:
    def __init__(self, index: int, request: GenerationRequest, tokenizer) -> None:
        self.index = index
        self.request = request
        self.params = request.params
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stops = StopMatcher(request.params.stop)
        self.generated: list[int] = []
        self.generator = None
        if not request.params.greedy:
            self.generator = torch.Generator()
            if request.params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(request.params.seed)


class Generator:
    """Decodes batches on one model, with the bridge when a handle is given."""

    def __init__(self, model, tokenizer, handle: BridgeHandle | None = None,
                 eos_token_ids: set[int] | None = None, fast_decode: bool = True,
                 prefix_cache: PrefixCache | None = None) -> None:
        self.model = model
        # Decode steps skip transformers' per-layer plumbing where the model is plain Llama,
        # with the same logits to the bit. `fast_decode=False` keeps the model's forward call.
        self.decode_step = LlamaDecodeStep.for_model(model) if fast_decode else None
        # Prompts that start with a cached prefix skip the layers below the bridge for it
        # (`senab.prefix`). That needs a plain Llama model, the one the decode step takes.
        self.prefix_cache = prefix_cache if prefix_cache is not None and prefix_cache.max_bytes > 0 else None
        self.prefix_prefill = None
        self._prefix_problem = "no prefix cache"
        if self.prefix_cache is not None:
            boundary = handle.bridge.config.first_layer if handle is not None else model.config.num_hidden_layers
            if self.decode_step is None:
                self._prefix_problem = "the model is not plain Llama"
            elif boundary == 0:
                self._prefix_problem = ("the bridge spans every layer, so no layer's keys and values depend on "
                                        "the tokens alone")
            else:
                self.prefix_prefill = PrefixPrefill(model, boundary)
        self.tokenizer = tokenizer
        self.handle = handle
        self.device = next(model.parameters()).device
        self.eos_token_ids = eos_token_ids if eos_token_ids is not None else default_eos_ids(model, tokenizer)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        contiguous_output_input(model)

    def stream(self, requests: list[GenerationRequest],
               should_cancel: Callable[[int], bool] | None = None) -> Iterator[list[RowOutput]]:
        """Yield, per decode step, the outputs of the rows that produced text or finished.

        Row i is `requests[i]`. `should_cancel(index)` is checked before every step; a
        cancelled row finishes with reason "cancelled" and no readout.
        """
        if not requests:
            return
        batch = DecodeBatch(self)
        batch.add(requests, list(range(len(requests))))
        while batch:
            outputs = batch.sample(should_cancel)
            if outputs:
                yield outputs
            batch.forward()

    def generate(self, requests: list[GenerationRequest]) -> list[RowOutput]:
        """Run the batch to completion and return each row's whole output."""
        results = [RowOutput(index=i) for i in range(len(requests))]
        for step in self.stream(requests):
            for output in step:
                result = results[output.index]
                result.text += output.text
                if output.finish_reason is not None:
                    result.finish_reason = output.finish_reason
                    result.token_ids = output.token_ids
                    result.prompt_tokens = output.prompt_tokens
                    result.completion_tokens = output.completion_tokens
                    result.readout = output.readout
        return results

    def _advance(self, row: _Row, logits: torch.Tensor,
                 should_cancel: Callable[[int], bool] | None, token: int | None = None) -> RowOutput:
        """Pick `row`'s next token from `logits` (or take `token`, already picked) and detokenize it."""
        output = RowOutput(index=row.index)
        release_held_text = False
        if should_cancel is not None and should_cancel(row.index):
            output.finish_reason = "cancelled"
        else:
            if token is None:
                token = sample_next_token(logits, row.params, row.generated, row.generator)
            if token in self.eos_token_ids:
                output.finish_reason = "stop"
                release_held_text = True
            else:
                row.generated.append(token)
                output.text, stopped = row.stops.push(row.detokenizer.push(token))
                if stopped:
                    output.finish_reason = "stop"
                elif len(row.generated) >= row.params.max_tokens:
                    output.finish_reason = "length"
                    release_held_text = True

        if release_held_text:
            # Finished without a stop string so far: the last held-back bytes may still
            # complete one; otherwise everything held back is released.
            tail, stopped = row.stops.push(row.detokenizer.flush())
            output.text += tail
            if stopped:
                output.finish_reason = "stop"
            else:
                output.text += row.stops.flush()
        output.token_ids = list(row.generated)
        output.prompt_tokens = len(row.request.prompt_ids)
        output.completion_tokens = len(row.generated)
        return output

    def _bridge_state(self, requests: list[GenerationRequest]) -> BridgeState | None:
        if self.handle is None or all(r.session is None for r in requests):
            if any(r.session is not None for r in requests):
                raise ValueError("a request carries a session vector but the generator has no bridge")
            return None
        channels = self.handle.bridge.config.nca.channels
        sessions = np.stack([
            np.zeros(channels, np.float32) if r.session is None else np.asarray(r.session, np.float32)
            for r in requests
        ])
        # Turn starts count real tokens, which is what BridgeState.positions counts.
        return BridgeState(self.handle.bridge, torch.from_numpy(sessions),
                           [r.turn_start for r in requests],
                           row_enabled=[r.session is not None for r in requests])

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt):] = 1
        return ids.to(self.device), mask.to(self.device)

    def prefix_blocker(self) -> str | None:
        """Return why a prefill now cannot use the prefix cache, or None when it can (drops stale entries)."""
        if self.prefix_prefill is None:
            return self._prefix_problem
        problem = self.prefix_prefill.blocker()
        if problem is None:
            self.prefix_cache.check(self.prefix_prefill.fingerprint())
        return problem

    def disable_prefix_cache(self, reason: str) -> None:
        """Stop using and filling the prefix cache for the rest of this generator's life."""
        self.prefix_prefill = None
        self._prefix_problem = reason
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    def _prefill_from_prefixes(self, entries: list[PrefixEntry], suffixes: list[list[int]],
                               bridge_state: BridgeState | None):
        """Run `PrefixPrefill` inside the bridge's context, as `_forward` runs a plain prefill."""
        self.decode_step.refresh()  # the model may have changed since the last prefill
        if bridge_state is not None:
            # The read-in hook runs inside the call and reads `valid`: the left-padded mask
            # of the whole prompts, which is also the mask the call returns.
            width = max(len(s) for s in suffixes) + entries[0].length
            valid = torch.zeros((len(entries), width), dtype=torch.bool, device=self.device)
            for row, suffix in enumerate(suffixes):
                valid[row, width - entries[row].length - len(suffix):] = True
            bridge_state.valid = valid
        context = self.handle.activate(bridge_state) if self.handle is not None else _null_context()
        with context:
            return self.prefix_prefill(entries, suffixes, self.pad_token_id)

    def _forward(self, input_ids, attention_mask, position_ids, cache, bridge_state: BridgeState | None,
                 valid: torch.Tensor | None, captured: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Return the (B, V) logits of each row's last position.

        Where `captured` is given, a prefill appends the hidden states that enter the bridge's
        first layer to it (`PrefixPrefill.capture`).
        """
        if bridge_state is not None:
            bridge_state.valid = valid
        context = self.handle.activate(bridge_state) if self.handle is not None else _null_context()
        with context:
            if self.decode_step is not None:
                if input_ids.shape[1] == 1 and cache.get_seq_length() > 0:
                    return self.decode_step(input_ids, attention_mask, position_ids, cache)
                # A prefill, and the model may have changed since the last one. This runs before
                # the capture's hook is added, so the decode steps do not count it as the model's.
                self.decode_step.refresh()
            with self.prefix_prefill.capture(captured) if captured is not None else _null_context():
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]  # (B, V)


class DecodeBatch:
    """A running batch that sequences join between steps and leave when they finish.

    `add` prefills new requests as their own left-padded batch and then merges their KV
    cache, NCA cache and readout sums into the running batch, padding the shorter side's
    history on the left. Padding is masked out of attention and positions are per row,
    so a row computes the same logits whichever rows share its batch and whenever it
    joined, up to float rounding. In float32 (the tests) greedy rows decode the same tokens.
    `step` samples one token for every row from the logits of the last forward call,
    drops finished rows, and runs the next forward call for the rest.

    NOTE: in bfloat16 the padding width and the batch size change the rounding of attention
    and of dense matrix products. Where the two best logits nearly tie, a greedy row can then
    pick another token than it would alone (3 of 8 real-model prompts in one check).
    """

    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.attention_mask: torch.Tensor | None = None  # (B, T) over the cached positions
        self.position_ids: torch.Tensor | None = None  # (B, 1) position of each row's last token
        self.bridge_state: BridgeState | None = None
        self.logits: torch.Tensor | None = None  # (B, V) for each row's next token
        self._pending: list[int] | None = None  # tokens sampled but not yet run through the model

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def add(self, requests: list[GenerationRequest], indices: list[int]) -> None:
        """Prefill `requests` and join them to the batch; `indices` name their outputs.

        Prompts of `LONG_PROMPT` tokens or more are prefilled apart from shorter ones, so
        that a layer which picks its method by the number of positions (int4 layers do) picks
        by each request's own prompt, whatever else arrives with it. Prompts that start with a
        cached prefix (`senab.prefix`) are prefilled in one call per length of that prefix.
        """
        if len(indices) != len(requests):
            raise ValueError(f"got {len(indices)} indices for {len(requests)} requests")
        if self._pending is not None:
            raise RuntimeError("DecodeBatch.add called between sample and forward")
        for i, request in zip(indices, requests):
            if not request.prompt_ids:
                raise ValueError(f"request {i} has an empty prompt")
        g = self.generator
        use_prefixes = g.prefix_cache is not None and g.prefix_blocker() is None
        # The longest cached prefix of each prompt that leaves at least one token to run.
        hits = [g.prefix_cache.lookup(r.cache_salt, r.prompt_ids, len(r.prompt_ids) - 1) if use_prefixes else None
                for r in requests]
        # One prefill call per prompt length class and length of the prefix found.
        groups: dict[tuple[bool, int], list[int]] = {}
        for position, (request, hit) in enumerate(zip(requests, hits)):
            key = (len(request.prompt_ids) >= LONG_PROMPT, 0 if hit is None else hit.length)
            groups.setdefault(key, []).append(position)
        before = len(self.rows)
        try:
            for key in sorted(groups):
                members = groups[key]
                self._add_group([requests[p] for p in members], [indices[p] for p in members],
                                [hits[p] for p in members] if key[1] else None, use_prefixes)
        except BaseException:
            # All or nothing: the caller treats every request of a failed add as failed.
            if len(self.rows) > before:
                self._select(list(range(before)))
            raise

    def _add_group(self, requests: list[GenerationRequest], indices: list[int],
                   prefixes: list[PrefixEntry] | None, use_prefixes: bool) -> None:
        """Prefill `requests` in one call, from their cached `prefixes` (all of one length) where given."""
        g = self.generator
        rows = [_Row(i, r, g.tokenizer) for i, r in zip(indices, requests)]
        bridge_state = g._bridge_state(requests)
        # Rows whose prefix before the turn start is worth caching and not cached yet.
        wanted = [(row, r.cache_salt, r.prompt_ids, r.turn_start) for row, r in enumerate(requests)
                  if use_prefixes and g.prefix_cache.wants(r.cache_salt, r.prompt_ids, r.turn_start)]
        if prefixes is not None:
            length = prefixes[0].length
            try:
                logits, cache, attention_mask, position_ids, boundary_hidden = g._prefill_from_prefixes(
                    prefixes, [r.prompt_ids[length:] for r in requests], bridge_state)
            except Exception:
                # The plain prefill computes the same; a fault here must not fail the requests.
                logger.exception("a prefill from cached prefixes failed; prefilling the whole prompts, and "
                                 "switching the prefix cache off")
                g.disable_prefix_cache("a prefill from cached prefixes failed (logged)")
                self._add_group(requests, indices, None, False)
                return
        else:
            input_ids, attention_mask = g._left_pad([r.prompt_ids for r in requests])
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            cache = new_kv_cache(g.model.config)
            captured: list[torch.Tensor] = []
            logits = g._forward(input_ids, attention_mask, position_ids, cache, bridge_state,
                                valid=attention_mask.bool(), captured=captured if wanted else None)
            boundary_hidden = captured[-1] if wanted else None
        if wanted:
            for entry in g.prefix_prefill.entries(cache, boundary_hidden, attention_mask, wanted):
                g.prefix_cache.insert(entry)
        if not self.rows:
            self.rows, self.cache, self.bridge_state, self.logits = rows, cache, bridge_state, logits
            self.attention_mask, self.position_ids = attention_mask, position_ids[:, -1:]
            return

        width = max(self.attention_mask.shape[1], attention_mask.shape[1])
        _merge_caches(self.cache, cache, width)
        self.attention_mask = torch.cat([_pad_left(self.attention_mask, width, dim=1),
                                         _pad_left(attention_mask, width, dim=1)])
        self.position_ids = torch.cat([self.position_ids, position_ids[:, -1:]])
        self.logits = torch.cat([self.logits, logits])
        self.rows += rows
        # A batch of base-model rows has no bridge state; give the side without one a
        # state whose rows are switched off, so both can join.
        if self.bridge_state is None and bridge_state is not None:
            self.bridge_state = self._switched_off(len(self.rows) - len(rows), bridge_state)
        elif self.bridge_state is not None and bridge_state is None:
            bridge_state = self._switched_off(len(rows), self.bridge_state)
        if self.bridge_state is not None:
            self.bridge_state.extend(bridge_state)

    def _select(self, keep: list[int]) -> None:
        """Keep only the rows at positions `keep` (in order) of every per-row state."""
        if not keep:
            self.__init__(self.generator)
            return
        index = torch.tensor(keep, device=self.generator.device)
        self.cache.batch_select_indices(index)
        self.attention_mask = self.attention_mask[index]
        self.position_ids = self.position_ids[index]
        self.logits = self.logits[index]
        if self.bridge_state is not None:
            self.bridge_state.select(index)
        self.rows = [self.rows[p] for p in keep]

    def _switched_off(self, count: int, like: BridgeState) -> BridgeState:
        bridge = self.generator.handle.bridge
        state = BridgeState(bridge, like.sessions.new_zeros((count, like.sessions.shape[1])), [0] * count,
                            row_enabled=[False] * count)
        state.cache = bridge.cell.empty_cache(count, device=like.cache[0].device, dtype=like.cache[0].dtype)
        return state

    def step(self, should_cancel: Callable[[int], bool] | None = None) -> list[RowOutput]:
        """Sample every row's next token, then run the forward call for the next one."""
        outputs = self.sample(should_cancel)
        self.forward()
        return outputs

    @torch.inference_mode()
    def sample(self, should_cancel: Callable[[int], bool] | None = None) -> list[RowOutput]:
        """Sample every row's next token from the last forward call and drop finished rows.

        Returns the outputs with text or a finish reason. Call `forward` before the next
        `sample`: a server sends these outputs first, so a token is not held back for the
        time of a forward call.
        """
        if self._pending is not None:
            raise RuntimeError("DecodeBatch.sample called twice without forward in between")
        g = self.generator
        outputs: list[RowOutput] = []
        next_tokens: list[int] = []
        keep: list[int] = []
        # Greedy rows without penalties take the argmax, found for all rows in one call. For
        # 16 rows of a 49K vocabulary that took 0.86 ms against 1.9 ms row by row.
        plain = [_plain_greedy(row.params) for row in self.rows]
        argmax = greedy_tokens(self.logits) if any(plain) else None
        for position, row in enumerate(self.rows):
            token = argmax[position] if plain[position] else None
            output = g._advance(row, self.logits[position], should_cancel, token)
            if output.finish_reason is not None:
                if self.bridge_state is not None and output.finish_reason != "cancelled" \
                        and row.request.session is not None:
                    output.readout = self.bridge_state.readout()[position].cpu().numpy().astype(np.float32)
            else:
                keep.append(position)
                next_tokens.append(row.generated[-1])
            if output.text or output.finish_reason is not None:
                outputs.append(output)
        if len(keep) < len(self.rows):
            self._select(keep)
        if self.rows:
            self._pending = next_tokens
        return outputs

    @torch.inference_mode()
    def forward(self) -> None:
        """Run the forward call on the tokens of the last `sample` (nothing when no rows are left)."""
        if self._pending is None:
            return
        g = self.generator
        step_ids = torch.tensor(self._pending, device=g.device).unsqueeze(1)
        self._pending = None
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones((len(self.rows), 1))], 1)
        self.position_ids = self.position_ids + 1
        self.logits = g._forward(step_ids, self.attention_mask, self.position_ids, self.cache, self.bridge_state,
                                 valid=None)

    def abort(self) -> list[int]:
        """Drop every row (after a failed forward call); return their indices."""
        indices = [row.index for row in self.rows]
        self.__init__(self.generator)
        return indices


def _plain_greedy(params: SamplingParams) -> bool:
    """Return True when `sample_next_token` would return the argmax of the raw logits."""
    return params.greedy and not (params.presence_penalty or params.frequency_penalty)


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _merge_caches(running: DynamicCache, joining: DynamicCache, width: int) -> None:
    """Append the rows of `joining` to `running`, both left-padded to `width` positions."""
    for target, source in zip(running.layers, joining.layers):
        target.keys = torch.cat([_pad_left(target.keys, width, dim=-2), _pad_left(source.keys, width, dim=-2)])
        target.values = torch.cat([_pad_left(target.values, width, dim=-2),
                                   _pad_left(source.values, width, dim=-2)])


class _null_context:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _make_contiguous(module, args: tuple) -> tuple:
    # Not `.contiguous()`: a (1, 1, d) view counts as contiguous whatever its strides, and
    # still takes the slow path.
    return (torch.empty_like(args[0], memory_format=torch.contiguous_format).copy_(args[0]), *args[1:])


def contiguous_output_input(model) -> None:
    """Make the output layer's input contiguous (once per model; idempotent).

    With `logits_to_keep=1` after a prefill, the output layer gets the last position of
    each row, a (B, 1, d) view with gaps. `F.linear` then runs as a batched product over a
    copy of the weight expanded B times. For the 49K x 576 output layer of SmolLM2 and 16
    prompts that copy is 0.9 GB, and it took 1.1 s of a 2.8 s prefill (torch 2.13, CPU). A
    contiguous input takes the plain matrix product, with the same logits.
    """
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is None or getattr(output, "_senab_contiguous_input", False):
        return
    output.register_forward_pre_hook(_make_contiguous)
    output._senab_contiguous_input = True


def default_eos_ids(model, tokenizer) -> set[int]:
    """Collect end-of-sequence ids from the tokenizer and the generation config."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos:
        ids.update(int(i) for i in config_eos)
    return ids
