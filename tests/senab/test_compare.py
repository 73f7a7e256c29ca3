"""`senab compare` on a tiny model, a bridge whose write-out changes replies and a LoRA adapter."""

import io
import json
import subprocess
import sys

import pytest
import torch

from senab.cli import main
from senab.compare import Answer, display_width, render_columns
from senab.train import attach_baseline
from tests.helpers import make_tiny_llama, save_model_and_bridge

PROMPT = "List three benefits of exercise."


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    save_model_and_bridge(root)
    adapted = attach_baseline(make_tiny_llama(seed=0)[0], "lora", rank=4)
    for name, parameter in adapted.named_parameters():
        if "lora_B" in name:  # zero-initialised by peft: make the adapter change the model
            torch.nn.init.normal_(parameter, std=0.5)
    adapted.save_pretrained(root / "run" / "lora" / "final" / "adapter")
    (root / "empty-run").mkdir()
    args = ["--model", str(root / "model"), "--bridge", str(root / "bridge"), "--run", str(root / "run"),
            "--device", "cpu", "--dtype", "float32", "--max-tokens", "6"]
    return root, args


def run_compare(args, capsys, monkeypatch, stdin: str | None = None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["compare", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_has_column_per_method(setup):
    root, args = setup
    # The installed command, as a user runs it.
    result = subprocess.run([sys.executable, "-m", "app.cli", "compare", PROMPT, *args, "--json",
                             "--temperature", "0.7", "--seed", "5"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.strip().splitlines()
    record = json.loads(line)
    assert record["prompt"] == PROMPT
    assert record["turn"] == 1
    assert record["sampling"] == {"max_tokens": 6, "temperature": 0.7, "top_p": 0.9, "seed": 5}
    assert record["checkpoint_trained"] is True
    assert record["dtype"] == "float32"
    assert [c["method"] for c in record["columns"]] == ["base", "senab", "lora"]
    keys = {"method", "label", "text", "finish_reason", "prompt_tokens", "completion_tokens", "latency_s",
            "tokens_per_second", "state"}
    for column in record["columns"]:
        assert set(column) == keys
        assert 1 <= column["completion_tokens"] <= 6
        assert column["latency_s"] > 0
        assert column["tokens_per_second"] == pytest.approx(column["completion_tokens"] / column["latency_s"])
    base, senab, lora = record["columns"]
    assert base["state"] is None
    assert lora["state"] is None
    assert senab["state"]["turn"] == 1
    assert senab["state"]["distance"] > 0
    assert 0 <= senab["state"]["arousal"] < 1
    assert senab["state"]["valence"] is None  # no probe in this bridge
    assert base["prompt_tokens"] == senab["prompt_tokens"] == lora["prompt_tokens"]


def test_greedy_columns_differ_by_model(setup, capsys, monkeypatch):
    _, args = setup
    code, out, _ = run_compare([PROMPT, *args, "--json", "--temperature", "0"], capsys, monkeypatch)
    assert code == 0
    texts = {c["method"]: c["text"] for c in json.loads(out)["columns"]}
    # The bridge's write-out and the adapter both change the greedy reply.
    assert texts["senab"] != texts["base"]
    assert texts["lora"] != texts["base"]


def test_prompt_loop_carries_state(setup, capsys, monkeypatch):
    _, args = setup
    code, out, _ = run_compare([*args, "--json", "--temperature", "0"], capsys, monkeypatch,
                               stdin="Hello\nHow are you?\n\n/reset\nHello\n/quit\nnever read\n")
    assert code == 0
    records = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["turn"] for r in records] == [1, 2, 1]
    assert [r["prompt"] for r in records] == ["Hello", "How are you?", "Hello"]
    states = [r["columns"][1]["state"] for r in records]
    assert states[1]["distance"] != states[0]["distance"]
    # After /reset the conversation starts again from the set-point with the same history.
    assert states[2] == states[0]
    assert records[1]["columns"][0]["prompt_tokens"] > records[0]["columns"][0]["prompt_tokens"]


def test_columns_fit_the_width(setup, capsys, monkeypatch):
    _, args = setup
    for width in (100, 60):
        code, out, _ = run_compare([PROMPT, *args, "--width", str(width)], capsys, monkeypatch)
        assert code == 0
        assert max(len(line) for line in out.splitlines()) <= width
        header = next(line for line in out.splitlines() if line.startswith("base"))
        assert "SENAB" in header
        assert "LoRA r=32" in header
        assert "arousal" in out
        assert "tokens/s" in out


def test_no_adapters_shows_two_columns(setup, capsys, monkeypatch):
    root, args = setup
    args = [a if a != str(root / "run") else str(root / "empty-run") for a in args]
    code, out, err = run_compare([PROMPT, *args, "--json"], capsys, monkeypatch)
    assert code == 0
    assert [c["method"] for c in json.loads(out)["columns"]] == ["base", "senab"]
    assert f"no LoRA or IA3 adapter in {root / 'empty-run'}" in err


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "3"], "temperature must be between 0 and 2, got 3.0"),
    (["--max-tokens", "0"], "max_tokens must be at least 1, got 0"),
    (["--width", "41"], "--width 41 is too narrow for 3 columns; use at least 42"),
    (["--run", "/nonexistent/run"], "run directory /nonexistent/run not found"),
])
def test_bad_settings_name_the_value(setup, capsys, monkeypatch, extra, message):
    _, args = setup
    code, out, err = run_compare([PROMPT, *args, *extra], capsys, monkeypatch)
    assert code in (1, 2)
    assert out == ""
    assert message in err


def test_empty_prompt_is_rejected(setup, capsys, monkeypatch):
    _, args = setup
    code, _, err = run_compare(["   ", *args], capsys, monkeypatch)
    assert code == 2
    assert "the prompt is empty" in err


def test_broken_adapter_names_directory(setup, capsys, monkeypatch, tmp_path):
    _, args = setup
    adapter = tmp_path / "lora" / "final" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"peft_type": "NOPE"}')
    args = [tmp_path.as_posix() if previous == "--run" else a for previous, a in zip([None, *args], args)]
    code, out, err = run_compare([PROMPT, *args], capsys, monkeypatch)
    assert code == 1
    assert out == ""
    assert f"the LoRA r=32 adapter in {adapter} cannot be loaded" in err
    assert "train it again with `make train`" in err
    assert "Traceback" not in err


def test_wide_characters_stay_aligned():
    answers = [Answer(method=m, label=m, text=text, finish_reason="stop", prompt_tokens=1, completion_tokens=1,
                      latency_s=1.0, tokens_per_second=1.0)
               for m, text in (("base", "请用中文列出运动的三个好处。😀" * 3), ("senab", "plain words " * 6),
                               ("lora", "\x1b[31mred\x1b[0m\tand tab"))]
    text = render_columns(answers, 60)
    assert "\x1b" not in text
    assert "\\x1b[31mred" in text
    for line in text.splitlines():
        assert display_width(line) <= 60, line
    # Every separator sits at the same terminal column on every line.
    for line in text.splitlines():
        if " | " in line:
            first = line.split(" | ")[0]
            assert display_width(first) == (60 - 6) // 3, line


def test_missing_bridge_is_a_clear_error(setup, capsys, monkeypatch, tmp_path):
    _, args = setup
    args = [*args[:2], "--bridge", str(tmp_path / "nowhere"), *args[4:]]
    code, _, err = run_compare([PROMPT, *args], capsys, monkeypatch)
    assert code == 1
    assert f"bridge checkpoint {tmp_path / 'nowhere'} has no manifest.json" in err
