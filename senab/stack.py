"""Run a Llama-style model in two parts: the frozen lower layers and the bridged upper ones.

Nothing below layer L-m depends on the bridge or the session state, so training computes
the input of layer L-m once per sequence (`lower_hidden`, no autograd) and then runs only
the last m layers, the final norm and the output layer for each turn (`upper_hidden`,
`token_logits`). Autograd therefore stops at layer L-m, and the output layer (a 49K-wide
matmul on SmolLM2) runs only at positions that carry a loss.

The last layer's output is needed only where a loss is taken, so `upper_hidden` can run its
query, attention output and MLP at those positions alone (keys and values still cover the
whole sequence).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from senab.bridge import architecture_for

# Model families whose decoder layer is exactly pre-norm Llama: q/k/v/o projections with
# rotary embeddings and full causal attention, then a pre-norm MLP. Qwen3 and SmolLM3 add
# query/key norms or skip rotary embeddings in some layers, so they take the full path.
QUERY_SUBSET_TYPES = frozenset({"llama"})


def _layers(model):
    arch = architecture_for(model.config.model_type)
    obj = model
    for part in arch.layers.split("."):
        obj = getattr(obj, part)
    return obj


def _run_layers(model, hidden: torch.Tensor, layers) -> torch.Tensor:
    """Run decoder layers over a causal sequence without padding (B, T, d)."""
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    position_embeddings = model.model.rotary_emb(hidden, position_ids=positions)
    # With no attention mask, SDPA applies the causal mask itself.
    for layer in layers:
        hidden = layer(hidden, attention_mask=None, position_embeddings=position_embeddings,
                       position_ids=positions, use_cache=False)
    return hidden


@torch.no_grad()
def lower_hidden(model, ids: list[int] | torch.Tensor, first_bridged_layer: int) -> torch.Tensor:
    """Return the residual stream at the input of layer `first_bridged_layer` (1, T, d)."""
    input_ids = torch.as_tensor(ids, device=model.device).reshape(1, -1)
    hidden = model.model.embed_tokens(input_ids)
    return _run_layers(model, hidden, _layers(model)[:first_bridged_layer])


def _last_layer_at(layer, hidden: torch.Tensor, position_embeddings, rows: torch.Tensor) -> torch.Tensor:
    """Return a Llama decoder layer's output at positions `rows` only (B, len(rows), d).

    Keys and values are computed at every position (they feed the attention at `rows`); the
    query, attention output and MLP run only at `rows`. Equal to `layer(hidden)[:, rows]`.
    """
    attention = layer.self_attn
    batch, length, _ = hidden.shape
    normed = layer.input_layernorm(hidden)
    head_dim = attention.head_dim
    query = attention.q_proj(normed[:, rows]).view(batch, len(rows), -1, head_dim).transpose(1, 2)
    key = attention.k_proj(normed).view(batch, length, -1, head_dim).transpose(1, 2)
    value = attention.v_proj(normed).view(batch, length, -1, head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    query, _ = apply_rotary_pos_emb(query, query, cos[:, rows], sin[:, rows])
    _, key = apply_rotary_pos_emb(key, key, cos, sin)
    # Causal mask of the selected queries: position rows[i] attends to keys 0..rows[i].
    allowed = torch.arange(length, device=hidden.device).unsqueeze(0) <= rows.unsqueeze(1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=attention.scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    out = attention.o_proj(out.transpose(1, 2).reshape(batch, len(rows), -1))
    hidden = hidden[:, rows] + out
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def upper_hidden(model, hidden: torch.Tensor, first_bridged_layer: int,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
    """Run layers `first_bridged_layer`.. and the final norm over `hidden` (B, T, d).

    With `rows`, return the result at those positions only (B, len(rows), d), which lets the
    last layer skip the other positions where the model family allows it.
    """
    layers = _layers(model)[first_bridged_layer:]
    if rows is None:
        return model.model.norm(_run_layers(model, hidden, layers))
    if model.config.model_type not in QUERY_SUBSET_TYPES or len(layers) < 2:
        # With one bridged layer the read-in hook sits on the last layer, which must then
        # run as a module.
        return model.model.norm(_run_layers(model, hidden, layers)[:, rows])
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    position_embeddings = model.model.rotary_emb(hidden, position_ids=positions)
    hidden = _run_layers(model, hidden, layers[:-1])
    return model.model.norm(_last_layer_at(layers[-1], hidden, position_embeddings, rows))


def token_logits(model, final_hidden: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Return output-layer logits of row 0 at `positions`, or at every row of `final_hidden`
    when it already holds only the wanted positions (N, V)."""
    return model.lm_head(final_hidden[0] if positions is None else final_hidden[0, positions])
