"""Tiny offline models for tests: a byte-level BPE tokenizer and a random Llama."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tests.conftest import free_port

SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Hello, world! How are you today? I am fine, thank you.",
    "A cellular automaton updates every cell from its neighbours at each step.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14",
    "Café, naïve, résumé, über.",
    "def main() -> int:\n    return 0\n",
    "{\"role\": \"user\", \"content\": \"hi\"}",
]


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (vocab 400) in memory, with ChatML special tokens.

    Any UTF-8 text round-trips through encode/decode because the 256 byte symbols are in the
    initial alphabet. Characters absent from the training text, such as "😀" or "日", encode as
    one token per UTF-8 byte, so a single token can decode to an incomplete character.
    The eos token is `<|im_end|>` and the pad token is `<pad>`.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer=trainer)

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=256,
    )


def make_tiny_llama(
    tmp_path: Path | str | None = None, *, seed: int = 0, layers: int = 4
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Build a random Llama (hidden 64, 4 heads, 2 KV heads, context 256) and its tokenizer.

    The weights depend only on `seed`. When `tmp_path` is given, the model, tokenizer and a
    generation config whose eos is `<|im_end|>` are saved there as a from_pretrained directory.
    """
    tokenizer = make_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    if tmp_path is not None:
        model.save_pretrained(tmp_path)
        tokenizer.save_pretrained(tmp_path)

    return model, tokenizer


def save_model_and_bridge(root: Path, model_name: str = "model") -> tuple[Path, Path]:
    """Save a tiny Llama as `root/model_name` and a bridge checkpoint for it as `root/bridge`.

    The bridge's write-out is random instead of zero, so a session's state changes the
    model's replies. Return the model and bridge directories.
    """
    import dataclasses

    from senab.bridge import new_checkpoint

    model, _ = make_tiny_llama(root / model_name, seed=0)
    checkpoint = new_checkpoint(model.config, base_model=model_name)
    torch.manual_seed(0)
    for layer in (checkpoint.bridge.write_k, checkpoint.bridge.write_v):
        torch.nn.init.normal_(layer.weight, std=0.5)
    # An empty id makes the checkpoint compute a new one for the changed weights.
    dataclasses.replace(checkpoint, checkpoint_id="").save(root / "bridge")
    return root / model_name, root / "bridge"


def _permute_for_gguf(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder q/k rows from the Hugging Face rotary layout to llama.cpp's interleaved one."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def save_tiny_gguf(
    path: Path | str,
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    *,
    chat_template: str | None = CHATML_TEMPLATE,
    eos_token: str = "<|im_end|>",
    q4_1: bool = False,
) -> Path:
    """Write `model` and its byte-level BPE `tokenizer` as a llama GGUF file, F32 throughout or,
    with `q4_1`, with the decoder's linear weights as Q4_1 (as in the default model's file).

    Tensor names follow llama.cpp, and q/k rows are permuted as the GGUF loader of transformers 5.25
    (`LlamaTensorProcessor`) expects, so transformers loads the file back to the same weights.
    `chat_template=None` omits the template, and `eos_token` chooses the token the file names as eos.
    """
    import gguf

    config = model.config
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)

    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special_ids = set(tokenizer.all_special_ids)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special_ids else 1 for i in range(len(tokens))])
    writer.add_token_merges([merge if isinstance(merge, str) else " ".join(merge) for merge in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.convert_tokens_to_ids(eos_token))
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    state = {key: value.detach().float() for key, value in model.state_dict().items()}
    writer_tensors = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
    }
    if not config.tie_word_embeddings:
        writer_tensors["output.weight"] = state["lm_head.weight"]
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            weight = state[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = _permute_for_gguf(weight, config.num_attention_heads)
            elif gguf_name == "attn_k":
                weight = _permute_for_gguf(weight, config.num_key_value_heads)
            writer_tensors[f"blk.{layer}.{gguf_name}.weight"] = weight
    for name, tensor in writer_tensors.items():
        if q4_1 and name.startswith("blk.") and tensor.ndim == 2:
            kind = gguf.GGMLQuantizationType.Q4_1
            writer.add_tensor(name, gguf.quants.quantize(tensor.numpy(), kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, tensor.numpy())

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def randomize_write_out(bridge, seed: int = 1) -> None:
    """Give the zero-initialized write-out random weights, so the bridge changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (bridge.write_k, bridge.write_v):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.5)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.5)


class ServerProcess:
    """`senab serve` in a child process on a free loopback port, ready once /readyz returns 200."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(self.port)],
            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self._wait_ready()

    def _wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
