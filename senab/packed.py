"""Dense float32 weights in oneDNN's blocked layout, for decoding on a CPU.

`F.linear` on a CPU calls MKL's sgemm on the plain (out, in) weight. For the few rows of
a decode step that is slow, and it grows fast with the rows. On a 2-core AMD EPYC with
AVX2 (torch 2.13), the 210 decoder layers of SmolLM2-135M took 44 ms for 1 row and
154 ms for 16, and the 49K x 576 output layer 13 and 57 ms. Reordered once into oneDNN's
blocked layout (`torch.ops.mkldnn._reorder_linear_weight`) and multiplied by
`torch.ops.mkldnn._linear_pointwise`, the same products took 41 and 87 ms, and the output
layer 6 and 18 ms.

The packed product also rounds each row the same way, to the bit, whatever the number of
rows in the call. On that machine MKL's sgemm rounded a row differently alone than in a
call with other rows. So with packed weights the linear layers do not make a row's logits
depend on its batch (attention over padding still can, in rounding).
`packing_blocker` checks both properties once per process on a small layer, and
`batch_dependent_shape` checks row invariance on one layer of each of the model's shapes
(oneDNN picks kernels by shape and CPU). `quantize_model` keeps the plain weights if either
fails. NOTE: the checks run on the loading thread's single intra-op thread, but the server
decodes on all cores. On AVX2 the rows were bit-identical with 1 and 2 threads.

Packed layers have no gradient, so only serving packs them. Training, evaluation and
`senab compare` keep the plain weights.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


class PackedLinear(nn.Module):
    """A frozen float32 linear layer whose weight is stored in oneDNN's blocked layout.

    The packed weight is a plain attribute, not a buffer, because a tensor in the mkldnn
    layout cannot be cast, saved or moved like a dense one. It stays float32 on the CPU. So a
    packed model is for inference only: `state_dict()` leaves the packed weights out, deepcopy
    and pickling raise, `.to(dtype)` leaves these layers in float32, and no gradient flows
    through them.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().float().contiguous(), None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, module: nn.Linear) -> PackedLinear:
        return cls(module.weight, module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != torch.float32:
            flat = flat.float()
        out = torch.ops.mkldnn._linear_pointwise(flat.contiguous(), self.packed, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layout=mkldnn"


def packing_blocker(device: torch.device, dtype: torch.dtype) -> str | None:
    """Return why packed weights cannot serve on `device` in `dtype`, or None when they can."""
    if device.type != "cpu":
        return f"the model runs on {device}"
    if dtype != torch.float32:
        # NOTE: oneDNN also packs bfloat16 weights, but that path has not been measured here.
        return f"the model runs in {str(dtype).removeprefix('torch.')}, and only float32 is packed"
    if not torch.backends.mkldnn.is_available():
        return f"this PyTorch {torch.__version__} was built without oneDNN"
    return _self_check()


@functools.cache
def _self_check() -> str | None:
    """Check once per process that the packed product matches `F.linear` and is row-invariant."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=generator)
    inputs = torch.randn(16, 64, generator=generator)
    try:
        layer = PackedLinear(weight, None)
        with torch.inference_mode():
            batched = layer(inputs)
            rows_alike = _rounds_rows_alike(layer, inputs, batched)
    except (RuntimeError, AttributeError) as exc:  # an op missing or renamed in this torch
        return f"oneDNN's packed linear failed in this PyTorch {torch.__version__} ({exc})"
    if not torch.allclose(batched, nn.functional.linear(inputs, weight), rtol=1e-5, atol=1e-5):
        return "oneDNN's packed linear does not match F.linear in this PyTorch"
    if not rows_alike:
        return "oneDNN's packed linear rounds a row differently in a batch than alone"
    return None


def _rounds_rows_alike(layer: PackedLinear, inputs: torch.Tensor, batched: torch.Tensor) -> bool:
    """Check that `layer` gives each row of `inputs` alone exactly its row of `batched`."""
    return all(torch.equal(layer(inputs[i:i + 1]), batched[i:i + 1]) for i in range(len(inputs)))


def batch_dependent_shape(model: nn.Module, rows: int = 16) -> str | None:
    """Return the first linear shape of `model` whose packed rows round differently alone than
    in a batch of `rows`, or None when every shape is row-invariant.

    Packs one layer of each shape with its own weights, because oneDNN picks its kernels by
    shape and by what the CPU supports. The check runs on the calling thread's intra-op
    threads only.
    """
    generator = torch.Generator().manual_seed(0)
    checked: set[tuple[int, int]] = set()
    for module in model.modules():
        if type(module) is not nn.Linear or tuple(module.weight.shape) in checked:
            continue
        checked.add(tuple(module.weight.shape))
        layer = PackedLinear.from_linear(module)
        inputs = torch.randn(rows, layer.in_features, generator=generator)
        with torch.inference_mode():
            if not _rounds_rows_alike(layer, inputs, layer(inputs)):
                return f"{layer.out_features} x {layer.in_features}"
    return None


def pack_model(model: nn.Module) -> int:
    """Replace every nn.Linear of `model` by a float32 `PackedLinear`; return how many.

    The output layer is packed too. When it shares its weight with the token embeddings,
    the packed copy costs one more copy of that matrix. Hooks on the replaced layers are
    not carried over, so register them after packing.
    """
    # Names only, so that each replaced layer's weight can be freed before the next is packed.
    names = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    for name in names:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attribute, PackedLinear.from_linear(getattr(parent, attribute)))
    return len(names)
