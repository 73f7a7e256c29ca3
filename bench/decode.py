"""Decode speed of one sequence on the default model, as ratios measured in one run.

- the bridge on (with a session) / the same loop with the bridge detached;
- the incremental loop (KV cache + NCA cache) / the original method's full recompute
  (the whole sequence through the model and the automaton for every new token);
- the bare model's own loop (`model.generate`, greedy) as the reference for bench/server.py.

Every loop decodes greedily for exactly the same number of new tokens (end-of-sequence
ignored). The model is loaded as the server loads it (`--dtype`, `--quantization`). The
recompute loop runs on that model and on a dense copy, and the ratio takes the faster of
the two. The 4-bit kernel speeds up one position at a time, but it is slower than dense
matrix products over many positions, which is all the recompute loop does. The recompute
runs in chunks between runs of the incremental loop, so that both sides of that ratio are
measured over the same minutes.
Usage: python bench/decode.py [--tokens 128] [--recompute-tokens 256] [--recompute-chunks 4]
       [--dtype auto] [--quantization auto]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import check, hardware, print_table, print_targets, save  # noqa: E402
from senab.bridge import BridgeState, attach_bridge, load_checkpoint, new_checkpoint  # noqa: E402
from senab.generation import GenerationRequest, Generator, SamplingParams  # noqa: E402
from senab.models import load_model  # noqa: E402
from senab.prompt import build_prompt  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and a storm."
WEIGHTS = Path(__file__).resolve().parents[1] / "senab" / "weights"


def generator_tokens_per_s(generator: Generator, request: GenerationRequest) -> float:
    started = time.perf_counter()
    result = generator.generate([request])[0]
    elapsed = time.perf_counter() - started
    assert result.completion_tokens == request.params.max_tokens, result.completion_tokens
    return result.completion_tokens / elapsed


@torch.inference_mode()
def bare_tokens_per_s(model, prompt_ids: list[int], tokens: int) -> float:
    input_ids = torch.tensor([prompt_ids])
    started = time.perf_counter()
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0)
    elapsed = time.perf_counter() - started
    assert out.shape[1] - len(prompt_ids) == tokens
    return tokens / elapsed


class Recompute:
    """A loop of the original method, which runs the whole sequence, lattice included, for every new token.

    `run(tokens)` continues the same greedy sequence, so a reply can be timed in chunks.
    """

    def __init__(self, model, handle, session: torch.Tensor, prompt_ids: list[int], turn_start: int) -> None:
        self.model, self.handle, self.session, self.turn_start = model, handle, session, turn_start
        self.ids = list(prompt_ids)
        self.seconds = 0.0
        self.tokens = 0

    @torch.inference_mode()
    def run(self, tokens: int) -> None:
        started = time.perf_counter()
        for _ in range(tokens):
            state = BridgeState(self.handle.bridge, self.session.unsqueeze(0), [self.turn_start])
            with self.handle.activate(state):
                logits = self.model(input_ids=torch.tensor([self.ids]), use_cache=False,
                                    logits_to_keep=1).logits[0, -1]
            self.ids.append(int(logits.argmax()))
        self.seconds += time.perf_counter() - started
        self.tokens += tokens

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per loop (default 128)")
    parser.add_argument("--recompute-tokens", type=int, default=256, help="new tokens for the recompute ratio")
    parser.add_argument("--recompute-chunks", type=int, default=4,
                        help="chunks of the recompute reply, each between two incremental runs (default 4)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating repeats of each loop (default 5)")
    parser.add_argument("--dtype", default="auto", help="model dtype (default auto, as the server)")
    parser.add_argument("--quantization", default="auto", help="auto, none or int4 (default auto, as the server)")
    args = parser.parse_args(argv)
    if not 1 <= args.recompute_chunks <= args.recompute_tokens:
        parser.error(f"--recompute-chunks {args.recompute_chunks} must be between 1 and --recompute-tokens "
                     f"({args.recompute_tokens})")

    loaded = load_model(None, dtype=args.dtype, quantization=args.quantization)
    model, tokenizer = loaded.model, loaded.tokenizer
    shipped = WEIGHTS / loaded.name
    checkpoint = load_checkpoint(shipped) if (shipped / "manifest.json").exists() else new_checkpoint(model.config)
    checkpoint.bridge.to(dtype=torch.float32)
    prompt = build_prompt(tokenizer, [("user", PROMPT)])
    session = checkpoint.bridge.set_point.detach().float()
    print(f"model {loaded.name} ({loaded.dtype}, {loaded.quantization}), bridge {checkpoint.checkpoint_id}; "
          f"{hardware()}")

    def request(tokens: int, with_session: bool) -> GenerationRequest:
        return GenerationRequest(prompt.ids, SamplingParams(max_tokens=tokens, temperature=0),
                                 session=session.numpy() if with_session else None, turn_start=prompt.turn_start)

    # Warm-up: allocator and kernels, both paths.
    Generator(model, tokenizer, eos_token_ids=set()).generate([request(8, False)])
    def bridge_on() -> float:
        handle = attach_bridge(model, checkpoint.bridge)
        try:
            return generator_tokens_per_s(Generator(model, tokenizer, handle, eos_token_ids=set()),
                                          request(args.tokens, True))
        finally:
            handle.detach()

    def bridge_off() -> float:
        return generator_tokens_per_s(Generator(model, tokenizer, eos_token_ids=set()), request(args.tokens, False))

    # Other tenants of a shared machine move single runs by 10% either way, while the bridge
    # costs a few percent. So the two loops run back to back, in alternating order, and the
    # ratio is the median over those pairs rather than a ratio of medians.
    without, with_bridge, bare = [], [], []
    for repeat in range(args.repeats):
        bare.append(bare_tokens_per_s(model, prompt.ids, args.tokens))
        if repeat % 2:
            with_bridge.append(bridge_on())
            without.append(bridge_off())
        else:
            without.append(bridge_off())
            with_bridge.append(bridge_on())
    bridge_ratio = float(np.median([on / off for on, off in zip(with_bridge, without)]))

    # A neighbour can slow memory-bound decoding for a minute and the compute-bound recompute
    # less, so the recompute's chunks alternate with whole incremental runs.
    handle = attach_bridge(model, checkpoint.bridge)
    recomputes = {loaded.quantization: Recompute(model, handle, session, prompt.ids, prompt.turn_start)}
    if loaded.int4:
        dense = load_model(None, dtype=args.dtype, quantization="none").model
        recomputes["dense weights"] = Recompute(dense, attach_bridge(dense, checkpoint.bridge), session,
                                                prompt.ids, prompt.turn_start)
    chunk = -(-args.recompute_tokens // args.recompute_chunks)
    incremental_runs = []
    for index in range(args.recompute_chunks + 1):
        incremental_runs.append(generator_tokens_per_s(Generator(model, tokenizer, handle, eos_token_ids=set()),
                                                       request(args.recompute_tokens, True)))
        if index < args.recompute_chunks:
            for recompute in recomputes.values():
                recompute.run(min(chunk, args.recompute_tokens - recompute.tokens))
    incremental = float(np.median(incremental_runs))
    recompute_rows = [[f"full recompute per token (original), {weights}", run.tokens, run.tokens_per_s]
                      for weights, run in recomputes.items()]
    recompute = max(row[2] for row in recompute_rows)

    rows = [
        ["bare model.generate", args.tokens, float(np.median(bare))],
        ["senab loop, bridge detached", args.tokens, float(np.median(without))],
        ["senab loop, bridge on", args.tokens, float(np.median(with_bridge))],
        ["senab loop, bridge on", args.recompute_tokens, incremental],
        *recompute_rows,
    ]
    print_table("decode tokens/s, one sequence (median of repeats)", ["loop", "new tokens", "tokens/s"], rows)
    targets = [
        check("bridge on / bridge detached (median of pairs)", bridge_ratio, 0.95),
        check(f"incremental / the faster full recompute, {args.recompute_tokens} tokens", incremental / recompute,
              8.0),
    ]
    met = print_targets(targets)
    save("decode", {"command": "python bench/decode.py " + " ".join(argv or sys.argv[1:]), "dtype": str(loaded.dtype),
                    "weights": loaded.quantization,
                    "rows": rows, "bare_tokens_per_s": float(np.median(bare)), "targets": targets})
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
