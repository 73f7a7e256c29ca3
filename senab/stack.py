"""Run a Llama-style model in two parts: the frozen lower layers and the bridged upper ones.

Nothing below layer L-m depends on the bridge or the session state, so training computes
the input of layer L-m once per sequence (`lower_hidden`, no autograd) and then runs only
the last m layers, the final norm and the output layer for each turn (`upper_hidden`,
`token_logits`). Autograd therefore stops at layer L-m, and the output layer (a 49K-wide
matmul on SmolLM2) runs only at positions that carry a loss.
"""

from __future__ import annotations

import torch

from senab.bridge import architecture_for


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


def upper_hidden(model, hidden: torch.Tensor, first_bridged_layer: int) -> torch.Tensor:
    """Run layers `first_bridged_layer`.. and the final norm over `hidden` (B, T, d)."""
    hidden = _run_layers(model, hidden, _layers(model)[first_bridged_layer:])
    return model.model.norm(hidden)


def token_logits(model, final_hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Return output-layer logits only at `positions` of row 0 (len(positions), V)."""
    return model.lm_head(final_hidden[0, positions])
