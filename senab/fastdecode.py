"""A decode step for Llama models that skips transformers' per-layer machinery.

A decode step of SmolLM2-135M on a CPU does little arithmetic. On a 2-core Xeon with AMX
(torch 2.13) the 4-bit products took 6 ms of a 31 ms step and the output layer about 5 ms. Much
of the rest is Python around them: transformers' decorators, keyword plumbing, attention
dispatch and output dataclasses, for each of 30 layers. `LlamaDecodeStep` runs the same
operations in the same order on the same modules, for one new position per row, without
that plumbing. It also runs the q, k and v projections, and the gate and up projections,
as one 4-bit product each where the layers allow it (`Int4Linear.concatenate`). Measured
step by step in one run, one row took 18.0 ms against 22.0 ms for `model(...)`, 16 rows
50.0 against 56.1 ms.

It computes exactly what the model's own forward call computes, to the bit: the tests
compare the logits of both for single rows, left-padded batches, 4-bit weights and the
bridge. One difference is deliberate. For a batch without padding, transformers passes no
mask and lets the attention kernel share each key and value head among its query heads
(`enable_gqa`). PyTorch 2.13's CPU kernel took 4 to 7 times as long that way for
SmolLM2-135M's shapes (2-core AMD EPYC: 450 against 100 us per layer for 16 rows at 43
positions, 65 against 15 us for one row), and rounds differently from the padded path: by up
to 3e-7 in float32, and at some lengths in bfloat16. The step runs every batch as
transformers runs a padded one, so a row's numbers do not depend on whether its batch is
padded; `TRANSFORMERS_SDPA_FORCE_GQA=1` still selects `enable_gqa`. The attention runs on a
compiled kernel (`attention_kernel_blocker`) in bfloat16 where the CPU has AVX-512 BF16, and
in float32 where it has AVX2 and FMA. PyTorch's spends most of such a call on set-up: on a
2-core AVX2 EPYC 16 float32 rows took 368 us per layer, the compiled one 186 us, and a
16-row step went from 88 to 77 ms. Both round differently from PyTorch's; the bit-equality
tests keep PyTorch's.

Between its products a layer still ran about 60 small tensor operations (norms, rotary
embedding, cache write, splits, residual adds), each a few microseconds of dispatch. Where
`layer_ops_blocker` passes, `_compiled_layer` runs them as four compiled calls
(senab/csrc/decode_layer.cpp) that equal PyTorch's to the bit, and fuses a layer's last
residual add with the next layer's input norm. On a 2-core Xeon with AMX, paired runs of
64 tokens went 1.25x as fast for one row and 1.13x for 8 and 16 rows, with the same tokens.
Those layers also keep their inputs as (B, hidden) and call each product's kernel straight
away, through a plan built once per number of rows (`_plan`): 1.05x to 1.13x for one row,
1.10x to 1.16x for 8 rows and 1.11x to 1.22x for 16 in two paired runs.

Hooks still run. The step runs a decoder layer's forward pre-hooks itself (the
bridge's read-in is one). A layer with any other hook, on it or on a module whose forward
call the step replaces (its norms, attention, MLP and projections), runs through its own
`__call__`. Hooks on the model send the whole step through the model's forward call. The
bridge's wrapped k/v projections add their deltas to their share of the fused product
(`BridgedProjection.add_delta`).

`LlamaDecodeStep.for_model` returns None for a model it does not reproduce exactly, such as
another family, another attention implementation or subclassed modules. The caller then
uses the model's forward call.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import DynamicCache
from transformers.activations import SiLUActivation
from transformers.masking_utils import create_causal_mask
from transformers.models.llama import modeling_llama as llama

from senab import native
from senab.bridge import BridgedProjection
from senab.kvcache import GrowingLayer
from senab.packed import cpu_flags
from senab.quant import Int4Linear

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class AttentionKernel:
    """A compiled attention for decode steps in one dtype: its source, flags and what it needs."""

    source: str  # a file in senab/csrc
    flags: tuple[str, ...]
    cpu_flags: tuple[str, ...]  # /proc/cpuinfo flags it needs
    operator: str  # "namespace::name" its library defines
    head_multiple: int  # head sizes it takes are multiples of this
    tolerance: float  # its self-check's largest error against float64, outputs below 1


ATTENTION_KERNELS = {
    # Each output rounded to bfloat16: half a step of 2^-8 relative.
    torch.bfloat16: AttentionKernel("decode_attention.cpp", (*native.COMMON_FLAGS, "-fopenmp", "-mavx512f",
                                                              "-mavx512bw", "-mavx512vl", "-mavx512bf16"),
                                    ("avx512_bf16", "avx512bw", "avx512vl"), "senab_attention::decode_attention",
                                    32, 2 ** -7),
    # Float32 sums over the self-check's 40 positions of 64 products each.
    torch.float32: AttentionKernel("decode_attention_avx2.cpp", (*native.COMMON_FLAGS, "-fopenmp", "-mavx2", "-mfma"),
                                   ("avx2", "fma"), "senab_attention_avx2::decode_attention", 8, 1e-5),
}


# The small operations between a layer's products as four compiled calls (senab/csrc/decode_layer.cpp).
# No products are fused into additions, so that they round where PyTorch's operations round.
LAYER_SOURCE = "decode_layer.cpp"
LAYER_FLAGS = (*native.COMMON_FLAGS, "-ffp-contract=off")
LAYER_DTYPES = (torch.float32, torch.bfloat16)
_SILU = (SiLUActivation, nn.SiLU)


class LlamaDecodeStep:
    """One decode step of a `LlamaForCausalLM`: one new token per row, cache in place."""

    def __init__(self, model: llama.LlamaForCausalLM) -> None:
        self.model = model
        self.inner = model.model
        self.layers = list(model.model.layers[: model.config.num_hidden_layers])
        # Fusions by (layer index, "qkv" or "gate_up"): the modules fused, the tensors and
        # versions they were copied from, and the fused 4-bit layer (None where they cannot fuse).
        self._fusions: dict[tuple[int, str], tuple[tuple[nn.Module, ...], tuple, Int4Linear | None]] = {}
        # Hooks per layer: "none", "pre" (forward pre-hooks on the layer only) or "all" (any other).
        self._layer_hooks: list[str] = []
        # Attention operators by dtype, for the dtypes the model has run in (`refresh` adds
        # those of `ATTENTION_KERNELS` that build and pass their self-check here).
        self.native_attention: dict[torch.dtype, object] = {}
        self._attention_checked: set[torch.dtype] = set()
        # The compiled operations between products (`layer_ops_blocker`), None where they cannot serve.
        self.layer_ops = None
        self._layer_ops_checked = False
        # Per layer: whether the compiled operations may run it, and the norm whose input
        # its last residual add feeds, when that add and norm may run as one call.
        self._compiled: list[bool] = []
        self._next_norm: list[llama.LlamaRMSNorm | None] = []
        # Per number of rows and dtype: each layer's products for the compiled path (`_plan`).
        self._plans: dict[tuple[int, torch.dtype], list[_LayerPlan]] = {}
        # Built now rather than at the first step, so that the memory is taken at start.
        self.refresh()

    def refresh(self) -> None:
        """Take in changes to the model since the last call: hooks, cast or loaded weights.

        Steps read what this finds rather than checking 60 fused layers and 270 modules
        each time, which took 1.2 ms per step. `Generator` calls it at every prefill, so a
        change made while a batch is decoding applies from the next prefill on.
        """
        self._layer_hooks = [self._hooks_of(layer) for layer in self.layers]
        # Only the model's dtype, so that a bfloat16 server does not build the float32 attention.
        dtype = self.inner.embed_tokens.weight.dtype
        if dtype not in self.native_attention and dtype not in self._attention_checked:
            self._attention_checked.add(dtype)
            problem = attention_kernel_blocker(dtype)
            if problem is None:
                self.native_attention[dtype] = _operator(ATTENTION_KERNELS[dtype].operator)
            else:
                logger.info("decode steps' attention in %s runs on PyTorch's: %s",
                            str(dtype).removeprefix("torch."), problem)
        for index, layer in enumerate(self.layers):
            self._fused(index, "qkv", _qkv(layer.self_attn))
            self._fused(index, "gate_up", (layer.mlp.gate_proj, layer.mlp.up_proj))
        if not self._layer_ops_checked:
            self._layer_ops_checked = True
            problem = layer_ops_blocker()
            if problem is None:
                self.layer_ops = torch.ops.senab_layer
            else:
                logger.info("decode steps run the operations between products in PyTorch: %s", problem)
        self._compiled = [self.layer_ops is not None and hooks != "all" and dtype in LAYER_DTYPES
                          and type(layer.mlp.act_fn) in _SILU
                          and all(_plain_norm(norm, dtype) for norm in (layer.input_layernorm,
                                                                          layer.post_attention_layernorm))
                          for layer, hooks in zip(self.layers, self._layer_hooks)]
        # The next layer's input norm where that layer has no hooks (a pre-hook must see the
        # sum before its norm), and the model's final norm after the last layer.
        self._next_norm = [following.input_layernorm if self._compiled[index + 1]
                           and self._layer_hooks[index + 1] == "none" else None
                           for index, following in enumerate(self.layers[1:])]
        self._plans.clear()
        final = self.inner.norm
        self._next_norm.append(final if self.layer_ops is not None and _plain_norm(final, dtype) else None)

    @classmethod
    def for_model(cls, model: nn.Module) -> LlamaDecodeStep | None:
        """Return the decode step of `model`, or None when its forward call is not plain Llama.

        One step serves every `Generator` of a model, because its fused layers take 0.3 s
        and about 140 MB to build for SmolLM2-135M with 4-bit weights and copies.
        """
        if type(model) is not llama.LlamaForCausalLM:
            return None
        config = model.config
        if config._attn_implementation != "sdpa" or getattr(config, "pretraining_tp", 1) != 1:
            return None
        inner = model.model
        if type(inner) is not llama.LlamaModel or type(inner.rotary_emb) is not llama.LlamaRotaryEmbedding:
            return None
        for layer in inner.layers:
            if (type(layer) is not llama.LlamaDecoderLayer or type(layer.self_attn) is not llama.LlamaAttention
                    or type(layer.mlp) is not llama.LlamaMLP
                    or type(layer.input_layernorm) is not llama.LlamaRMSNorm
                    or type(layer.post_attention_layernorm) is not llama.LlamaRMSNorm):
                return None
        step = model.__dict__.get("_senab_decode_step")
        if step is None:
            step = cls(model)
            model._senab_decode_step = step
        return step

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 cache: DynamicCache) -> torch.Tensor:
        """Return the (B, V) logits of the new position, and grow `cache` by that position.

        `input_ids` and `position_ids` are (B, 1); `attention_mask` (B, S) covers the cached
        positions and the new one, 0 for left padding.
        """
        if input_ids.shape[1] != 1:
            raise ValueError(f"Invalid input_ids of {input_ids.shape[1]} positions per row: a decode step takes one, "
                             "so run prompts through the model's forward call")
        if (self.model.config._attn_implementation != "sdpa" or _hooked(self.model) or _hooked(self.inner)
                or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks):
            # Hooks on the modules whose forward calls this step replaces must still run.
            return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1, :]
        hidden = self.inner.embed_tokens(input_ids)
        mask = create_causal_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=cache, position_ids=position_ids)
        position_embeddings = self.inner.rotary_emb(hidden, position_ids=position_ids)
        cos = position_embeddings[0].unsqueeze(1)
        sin = position_embeddings[1].unsqueeze(1)
        ops = self.layer_ops if hidden.dtype in LAYER_DTYPES else None
        gqa = os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA", "0") == "1"
        normed = None  # the input norm of `hidden`, where the last layer computed it
        batch = hidden.shape[0]
        # Compiled layers pass (B, hidden) tensors, which their products take without reshapes;
        # other layers and hooks get the (B, 1, hidden) view.
        flat = None
        for index, layer in enumerate(self.layers):
            carried, normed = normed, None
            hooks = self._layer_hooks[index]
            if hooks != "none":
                if flat is not None:
                    hidden, flat = flat.view(batch, 1, -1), None
                options = dict(attention_mask=mask, position_embeddings=position_embeddings,
                               position_ids=position_ids, cache=cache, use_cache=True)
                if hooks == "all":
                    hidden = layer(hidden, **options)
                    continue
                args, kwargs = _run_pre_hooks(layer, (hidden,), options)
                if len(args) != 1 or args[0] is not hidden or kwargs != options:
                    hidden = layer.forward(*args, **kwargs)  # as `nn.Module.__call__` does after pre-hooks
                    continue
            cache_layer = cache.layers[index]
            if ops is not None and self._compiled[index] and type(cache_layer) is GrowingLayer and not gqa:
                if flat is None:
                    flat = hidden.view(batch, -1)
                flat, normed = self._compiled_layer(ops, layer, flat, carried, position_embeddings, mask,
                                                    cache_layer, index, self._plan(batch, hidden.dtype)[index])
                continue
            if flat is not None:
                hidden, flat = flat.view(batch, 1, -1), None
            # No module of this layer has hooks, so calling `forward` directly skips only
            # `nn.Module.__call__`'s checks for them (about 4% of a one-row step, paired steps).
            residual = hidden
            attention = self._attention(layer.self_attn, layer.input_layernorm.forward(hidden), cos, sin, mask,
                                        cache, index, gqa)
            hidden = residual + attention
            residual = hidden
            hidden = residual + self._mlp(layer.mlp, layer.post_attention_layernorm.forward(hidden), index)
        if flat is not None:
            hidden = flat.view(batch, 1, -1)
        if normed is None or _hooked(self.inner.norm):
            # A hook added to the final norm since the last prefill still runs.
            hidden = self.inner.norm(hidden)
        else:
            hidden = normed.view(batch, 1, -1)
        return self.model.lm_head(hidden[:, -1:, :])[:, -1, :]

    def _plan(self, rows: int, dtype: torch.dtype) -> list[_LayerPlan]:
        """Return each layer's products for steps of `rows` rows, built at the first such step after a refresh."""
        plans = self._plans.get((rows, dtype))
        if plans is None:
            plans = []
            for index, layer in enumerate(self.layers):
                attention, mlp = layer.self_attn, layer.mlp
                fused_qkv = self._fusions[(index, "qkv")][2]
                fused_gate_up = self._fusions[(index, "gate_up")][2]
                projections = _qkv(attention)
                plans.append(_LayerPlan(
                    qkv=_product(fused_qkv, rows, dtype) if fused_qkv is not None else None,
                    q_k_v=tuple(_product(_base(p), rows, dtype) for p in projections),
                    qkv_sizes=[_base(p).out_features for p in projections],
                    bridged=tuple(p if type(p) is BridgedProjection else None for p in projections),
                    o=_product(attention.o_proj, rows, dtype),
                    gate_up=_product(fused_gate_up, rows, dtype) if fused_gate_up is not None else None,
                    gate=_product(mlp.gate_proj, rows, dtype), up=_product(mlp.up_proj, rows, dtype),
                    gate_up_sizes=[mlp.gate_proj.out_features, mlp.up_proj.out_features],
                    down=_product(mlp.down_proj, rows, dtype)))
            self._plans[(rows, dtype)] = plans
        return plans

    def _compiled_layer(self, ops, layer: llama.LlamaDecoderLayer, hidden: torch.Tensor, normed: torch.Tensor | None,
                        position_embeddings: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                        cache_layer: GrowingLayer, index: int, plan: _LayerPlan
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run a decoder layer on (B, hidden) `hidden` with the compiled operations between its products.

        `normed` is the layer's input norm of `hidden` where the previous layer computed it.
        Returns the layer's output and, where `_next_norm` names one, that norm of it.
        """
        attention, mlp = layer.self_attn, layer.mlp
        batch = hidden.shape[0]
        if normed is None:
            norm = layer.input_layernorm
            normed = ops.rms_norm(hidden, norm.weight, norm.variance_epsilon)
        if plan.qkv is not None:
            query, key, value = plan.qkv(normed).split(plan.qkv_sizes, -1)
        else:
            query, key, value = (product(normed) for product in plan.q_k_v)
        if plan.bridged[1] is not None or plan.bridged[2] is not None:
            # The bridge's k and v projections add their deltas, which are (B, 1, width).
            key, value = (out if p is None else p.add_delta(out.view(batch, 1, -1)).view(batch, -1)
                          for p, out in zip(plan.bridged[1:], (key, value)))
        head_dim = attention.head_dim
        keys, values, position = cache_layer.reserve((batch, key.shape[-1] // head_dim, head_dim), hidden)
        # (B, key heads, groups, D): each group's heads are the query positions of its key head.
        query = ops.rope_cache(query, key, value, position_embeddings[0], position_embeddings[1], keys, values,
                               position, attention.num_key_value_groups)
        cache_layer.advance()
        out = self._attend(attention, query, cache_layer.keys, cache_layer.values, mask, gqa=False, flat=True,
                           project=plan.o)
        norm = layer.post_attention_layernorm
        hidden, normed = ops.add_rms_norm(hidden, out, norm.weight, norm.variance_epsilon)
        if plan.gate_up is not None:
            gate, up = plan.gate_up(normed).split(plan.gate_up_sizes, -1)
        else:
            gate, up = plan.gate(normed), plan.up(normed)
        # The activation is checked at each step, as the Python path calls whatever module is there.
        activated = ops.silu_mul(gate, up) if type(mlp.act_fn) in _SILU else mlp.act_fn(gate) * up
        down = plan.down(activated)
        following = self._next_norm[index]
        if following is None:
            return hidden + down, None
        return ops.add_rms_norm(hidden, down, following.weight, following.variance_epsilon)

    @staticmethod
    def _hooks_of(layer: llama.LlamaDecoderLayer) -> str:
        """Return which hooks `layer` and the modules whose forward calls the step replaces in it have.

        "pre" when the layer has forward pre-hooks and nothing else has hooks: the step runs
        them itself and keeps its own path (the bridge's read-in is such a hook). "all" for
        any other hook, so that the layer runs through its own `__call__`. "none" otherwise.
        """
        attention, mlp = layer.self_attn, layer.mlp
        inner = (layer.input_layernorm, layer.post_attention_layernorm, attention, *_qkv(attention),
                 attention.o_proj, mlp, mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn)
        if any(_hooked(module) or _hooked(_base(module)) for module in inner) or layer._forward_hooks \
                or layer._backward_hooks or layer._backward_pre_hooks:
            return "all"
        if layer._forward_pre_hooks:
            return "pre" if hasattr(layer, "_forward_pre_hooks_with_kwargs") else "all"
        return "none"

    def _fused(self, index: int, kind: str, modules: tuple[nn.Module, ...]) -> Int4Linear | None:
        """Return the 4-bit layer that computes `modules` in one product, or None.

        Built again whenever the modules, their weight tensors or those tensors' versions
        have changed, so that `.to(dtype)` and `load_state_dict` on the model reach it. The
        bridge's wrapped k and v projections fuse by their base layers and add their deltas
        afterwards.
        """
        bases = [_base(module) for module in modules]
        if not all(type(base) is Int4Linear for base in bases):
            self._fusions[(index, kind)] = (modules, (), None)
            return None
        state = tuple((tensor, _version(tensor)) for base in bases for tensor in _weight_tensors(base))
        cached = self._fusions.get((index, kind))
        if (cached is None or any(a is not b for a, b in zip(cached[0], modules))
                or any(a is not b or va != vb for (a, va), (b, vb) in zip(cached[1], state))):
            cached = (modules, state, Int4Linear.concatenate(bases))
            self._fusions[(index, kind)] = cached
        return cached[2]

    def _mlp(self, mlp: llama.LlamaMLP, hidden: torch.Tensor, index: int) -> torch.Tensor:
        """Run `LlamaMLP.forward`, with the gate and up projections in one 4-bit product where they fuse."""
        fused = self._fusions[(index, "gate_up")][2]
        if fused is None:
            return mlp.forward(hidden)
        gate, up = _project(fused, hidden).split([mlp.gate_proj.out_features, mlp.up_proj.out_features], -1)
        return _project(mlp.down_proj, mlp.act_fn.forward(gate) * up)

    def _projections(self, attention: llama.LlamaAttention, hidden: torch.Tensor, index: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the (B, 1, width) q, k and v of `hidden`, bridge deltas included, from one product where they fuse."""
        projections = _qkv(attention)
        fused = self._fusions[(index, "qkv")][2]
        if fused is None:
            return tuple(_project(projection, hidden) for projection in projections)
        outputs = _project(fused, hidden).split([_base(p).out_features for p in projections], -1)
        # The bridge's k and v projections add their deltas to their share of the product.
        return tuple(p.add_delta(out) if type(p) is BridgedProjection else out for p, out in zip(projections, outputs))

    def _attention(self, attention: llama.LlamaAttention, hidden: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, mask: torch.Tensor | None, cache: DynamicCache, index: int,
                   gqa: bool) -> torch.Tensor:
        """Run `LlamaAttention.forward` with `sdpa_attention_forward` for one query position."""
        batch = hidden.shape[0]
        shape = (batch, 1, -1, attention.head_dim)
        query, key, value = self._projections(attention, hidden, index)
        query = query.view(shape).transpose(1, 2)
        key = key.view(shape).transpose(1, 2)
        value = value.view(shape).transpose(1, 2)
        query = query * cos + llama.rotate_half(query) * sin
        key = key * cos + llama.rotate_half(key) * sin
        key, value = cache.update(key, value, index)
        groups = attention.num_key_value_groups
        if groups > 1 and not gqa:
            # One query position: the heads of a group become its query positions. Also
            # where transformers would pass `enable_gqa` (no mask): see the module's notes.
            query = query.reshape(batch, query.shape[1] // groups, groups, query.shape[-1])
        return self._attend(attention, query, key, value, mask, gqa=groups > 1 and gqa)

    def _attend(self, attention: llama.LlamaAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor | None, gqa: bool, flat: bool = False, project=None) -> torch.Tensor:
        """Return the o projection of the attention of (B, heads, G, D) `query` over the cache.

        The result is (B, 1, heads * D), or (B, heads * D) where `flat`. There `project`, a
        `_product` of the o projection, computes it.
        """
        kernel = self.native_attention.get(query.dtype)
        if kernel is not None and not gqa and _native_attention_takes(query, key, value, mask):
            out = kernel(query, key, value, mask, attention.scaling)
        else:
            options = {"enable_gqa": True} if gqa else {}
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0,
                                                 scale=attention.scaling, is_causal=False, **options)
        # (B, heads, 1, D) to (B, 1, heads * D), moving the same values as transformers' reshapes.
        batch = query.shape[0]
        if flat:
            out = out.view(batch, -1) if out.is_contiguous() else out.reshape(batch, -1)
            return project(out)
        out = out.reshape(batch, -1, 1, value.shape[-1]).transpose(1, 2).reshape(batch, 1, -1)
        return _project(attention.o_proj, out)


def _native_attention_takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            mask: torch.Tensor | None) -> bool:
    """Return whether the compiled attention of query's dtype takes these (B, heads, G, D) inputs (its checks)."""
    kernel = ATTENTION_KERNELS.get(query.dtype)
    if (kernel is None or query.shape[-1] % kernel.head_multiple or query.shape[-1] > 256 or query.shape[2] > 16
            or key.dtype != query.dtype or value.dtype != query.dtype or key.shape != value.shape
            or key.shape[2] < 1 or query.stride(3) != 1 or key.stride(3) != 1 or key.stride() != value.stride()):
        return False
    return mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[0] == query.shape[0]
                            and mask.shape[1] == mask.shape[2] == 1 and mask.shape[3] == key.shape[2]
                            and mask.stride(3) == 1)


def _operator(name: str):
    namespace, name = name.split("::")
    return getattr(getattr(torch.ops, namespace), name)


@functools.cache
def attention_kernel_blocker(dtype: torch.dtype) -> str | None:
    """Return why the compiled attention for decode steps in `dtype` cannot serve here, or None (builds it once).

    bfloat16 needs AVX-512 BF16, float32 AVX2 with FMA; other dtypes have none. A
    self-check against a float64 attention decides whether it serves.
    """
    kernel = ATTENTION_KERNELS.get(dtype)
    if kernel is None:
        return f"no compiled attention takes {str(dtype).removeprefix('torch.')}"
    missing = [flag for flag in kernel.cpu_flags if flag not in cpu_flags()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    problem = native.load(kernel.source, kernel.flags, kernel.operator)
    if problem:
        return problem
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(3, 2, 3, 64, generator=generator).to(dtype)
    key, value = (torch.randn(3, 2, 40, 64, generator=generator).to(dtype) for _ in range(2))
    mask = torch.ones(3, 1, 1, 40, dtype=torch.bool)
    mask[1, ..., :7] = False
    try:
        out = _operator(kernel.operator)(query, key, value, mask, 0.125)
    except RuntimeError as error:
        return f"the compiled attention failed its self-check: {error}"
    expected = F.scaled_dot_product_attention(query.double(), key.double(), value.double(), attn_mask=mask,
                                              scale=0.125)
    error = (out.double() - expected).abs().max().item()
    if not error <= kernel.tolerance:
        return f"the compiled attention is off by {error:.3g} in its self-check"
    return None


@functools.cache
def layer_ops_blocker() -> str | None:
    """Return why the compiled operations between a layer's products cannot serve here, or None (builds them once).

    A self-check in both dtypes compares them with transformers' modules, which they equal
    to the bit.
    """
    problem = native.load(LAYER_SOURCE, LAYER_FLAGS, "senab_layer::rope_cache")
    if problem:
        return problem
    ops = torch.ops.senab_layer
    generator = torch.Generator().manual_seed(0)
    config = llama.LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    rotary = llama.LlamaRotaryEmbedding(config)
    for dtype in LAYER_DTYPES:
        def sample(*shape):
            return torch.randn(*shape, generator=generator).to(dtype)

        hidden, other, qkv = sample(3, 1, 128), sample(3, 1, 128), sample(3, 1, 256)
        norm = llama.LlamaRMSNorm(128, eps=1e-5).to(dtype)
        norm.weight.data = sample(128)
        query, key, value = qkv.split([128, 32 * 2, 32 * 2], -1)
        cos, sin = rotary(hidden, torch.tensor([[5], [9], [0]]))
        keys, values = sample(3, 2, 8, 32), sample(3, 2, 8, 32)
        try:
            total, normed = ops.add_rms_norm(hidden, other, norm.weight, norm.variance_epsilon)
            rotated = ops.rope_cache(query, key, value, cos, sin, keys, values, 6, 2)
            activated = ops.silu_mul(hidden, other)
        except RuntimeError as error:
            return f"the compiled layer operations failed their self-check: {error}"
        shape = (3, 1, -1, 32)
        expected_query, expected_key = (x.view(shape).transpose(1, 2) * cos.unsqueeze(1)
                                        + llama.rotate_half(x.view(shape).transpose(1, 2)) * sin.unsqueeze(1)
                                        for x in (query, key))
        exact = (torch.equal(total, hidden + other) and torch.equal(normed, norm(hidden + other))
                 and torch.equal(activated, F.silu(hidden) * other)
                 and torch.equal(rotated.view(3, 4, 1, 32), expected_query)
                 and torch.equal(keys[:, :, 6:7], expected_key)
                 and torch.equal(values[:, :, 6:7], value.view(shape).transpose(1, 2)))
        if not exact:
            return f"the compiled layer operations disagree with transformers' in {str(dtype).removeprefix('torch.')}"
    return None


@dataclass(frozen=True)
class _LayerPlan:
    """A layer's products for decode steps of one number of rows: functions of (B, in) to (B, out)."""

    qkv: object | None  # the fused q, k and v product, or None
    q_k_v: tuple  # the three products apart, where they do not fuse
    qkv_sizes: list[int]
    bridged: tuple  # the bridge's wrapper of q, k and v, or None for each
    o: object
    gate_up: object | None
    gate: object
    up: object
    gate_up_sizes: list[int]
    down: object


def _product(module: nn.Module, rows: int, dtype: torch.dtype):
    """Return a function of contiguous (rows, in) inputs that computes `module.forward` for decode steps.

    A 4-bit layer calls its kernel straight away (`Int4Linear.step_kernel`): `_project` and
    `Int4Linear.kernel` made the same choice at every call, with checks and about 4 tensor
    operations of reshapes per product.
    """
    kernel = module.step_kernel(rows, dtype) if type(module) is Int4Linear else None
    return module.forward if kernel is None else kernel


def _plain_norm(norm: nn.Module, dtype: torch.dtype) -> bool:
    """Return whether `norm` is transformers' RMS norm with a contiguous weight of `dtype`, as the compiled norm takes."""
    return (type(norm) is llama.LlamaRMSNorm and not _hooked(norm) and norm.weight.dtype == dtype
            and norm.weight.dim() == 1 and norm.weight.is_contiguous())


def _project(module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Return `module.forward(hidden)` for a (B, 1, in) `hidden`, straight to the kernel for 4-bit layers.

    `Int4Linear.forward` spent about 7 us per call on checks for prompts and dtypes, 0.8 ms
    over the 120 products of a step.
    """
    if type(module) is Int4Linear:
        rows = hidden.shape[0]
        if not module.copy_serves(rows, 1) and hidden.dtype == module.scales_and_zeros.dtype:
            return module.kernel(hidden.reshape(rows, -1).contiguous()).unsqueeze(1)
    return module.forward(hidden)


def _qkv(attention: llama.LlamaAttention) -> tuple[nn.Module, nn.Module, nn.Module]:
    return attention.q_proj, attention.k_proj, attention.v_proj


def _base(module: nn.Module) -> nn.Module:
    """Return the projection a `BridgedProjection` wraps, or `module` itself."""
    return module.base if type(module) is BridgedProjection else module


def _run_pre_hooks(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Run `layer`'s forward pre-hooks as `nn.Module.__call__` does, and return the args and kwargs for `forward`."""
    with_kwargs = layer._forward_pre_hooks_with_kwargs
    for hook_id, hook in layer._forward_pre_hooks.items():
        if hook_id in with_kwargs:
            result = hook(layer, args, kwargs)
            if result is not None:
                args, kwargs = result
        else:
            result = hook(layer, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
    return args, kwargs


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _weight_tensors(layer: Int4Linear) -> tuple[torch.Tensor, ...]:
    """Return the tensors that a fused layer copies from `layer`."""
    tensors = (layer.packed, layer.scales_and_zeros)
    return tensors if layer.bias is None else (*tensors, layer.bias)


def _version(tensor: torch.Tensor) -> int:
    """Return the in-place version of `tensor`, or 0 for an inference tensor, which has none."""
    try:
        return tensor._version
    except RuntimeError:
        return 0
