"""The training and evaluation pipeline on a tiny random model and real chitchat conversations."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from senab.bridge import BridgeState, attach_bridge, load_checkpoint, new_checkpoint
from senab.data import (
    NEGATIVE_VALENCE, EncodedTurn, Window, encode_window, load_chitchat, pick_with_negatives, split_conversations,
)
from senab.evaluate import distinct_n, evaluate_run, silhouette
from senab.experiment import DataConfig, run
from senab.stack import lower_hidden, upper_hidden
from senab.state import Homeostasis
from senab.train import TrainConfig, Trainer, batch_schedule, latest_step_dir, state_losses, turn_readout
from tests.helpers import make_tiny_llama, make_tiny_tokenizer

SMALL_DATA = DataConfig(conversations=300, train_windows=10, validation_windows=4, test_windows=4, max_length=256)


def load_tiny():
    model, tokenizer = make_tiny_llama(seed=0)
    return SimpleNamespace(model=model, tokenizer=tokenizer, name="tiny", digest=None)


@pytest.fixture(scope="module")
def conversations():
    return load_chitchat()


def test_split_is_disjoint_by_conversation(conversations):
    split = split_conversations(conversations, seed=0)
    ids = [{c.id for c in part} for part in (split.train, split.validation, split.test)]

    assert ids[0].isdisjoint(ids[1])
    assert ids[0].isdisjoint(ids[2])
    assert ids[1].isdisjoint(ids[2])
    assert sum(len(part) for part in ids) == len(conversations)
    assert split_conversations(conversations, seed=0).test == split.test
    assert split_conversations(conversations, seed=1).test != split.test


def test_conversations_alternate_roles(conversations):
    assert len(conversations) > 4000
    assert all(c.turns and all(user and reply for user, reply in c.turns) for c in conversations[:200])


def test_loss_mask_covers_exactly_assistant_tokens():
    tokenizer = make_tiny_tokenizer()
    turns = [("Hello there, how are you?", "I am fine.\nThanks!"), ("What is 2 + 2?", "4, naturally.")]
    window = encode_window(tokenizer, "c1", turns, [0.5, -0.25])

    masked_text = tokenizer.decode([window.ids[i] for i in window.loss_positions()])
    user_text = tokenizer.decode(window.ids[window.turns[1].user_start:window.turns[1].reply_start])

    assert masked_text == "I am fine.\nThanks!<|im_end|>4, naturally.<|im_end|>"
    assert user_text.startswith("What is 2 + 2?")
    assert [t.valence for t in window.turns] == [0.5, -0.25]


def test_batch_schedule_reshuffles_per_epoch():
    schedule = batch_schedule(5, steps=6, batch_size=2, seed=3)

    assert len(schedule) == 6
    assert all(len(batch) == 2 for batch in schedule)
    assert sorted(i for batch in schedule[:2] for i in batch) == sorted(set(i for b in schedule[:2] for i in b))
    assert schedule == batch_schedule(5, steps=6, batch_size=2, seed=3)


def test_turn_readout_matches_bridge_hook():
    model, tokenizer = make_tiny_llama(seed=0)
    checkpoint = new_checkpoint(model.config)
    handle = attach_bridge(model, checkpoint.bridge)
    window = encode_window(tokenizer, "c", [("Hello, world! How is the weather today?", "Sunny and warm."),
                                            ("Numbers: 1 2 3", "4 5")], [0.0, 0.0])
    turn = window.turns[1]
    # turn_readout grows only the receptive field before the turn; make that a real cut.
    assert turn.user_start > checkpoint.bridge.config.nca.receptive_field
    first = checkpoint.bridge.config.first_layer
    hidden = lower_hidden(model, window.ids, first)
    state = torch.randn(32)

    with torch.no_grad():
        bridge_state = BridgeState(checkpoint.bridge, state.unsqueeze(0), [turn.user_start])
        with handle.activate(bridge_state):
            upper_hidden(model, hidden[:, :turn.reply_end], first)
        expected = bridge_state.readout()[0]
        readout = turn_readout(checkpoint.bridge, hidden, state, turn.user_start, turn.reply_end)

    torch.testing.assert_close(readout, expected, atol=1e-6, rtol=0)


def test_last_layer_at_loss_positions_equals_full_pass():
    # The training pass runs the last layer only where the loss is taken. Its outputs and the
    # bridge's gradients must equal those of the full pass at those positions.
    model, _ = make_tiny_llama(seed=1)
    checkpoint = new_checkpoint(model.config)
    torch.manual_seed(0)
    for layer in (checkpoint.bridge.write_k, checkpoint.bridge.write_v):
        torch.nn.init.normal_(layer.weight, std=0.5)
    handle = attach_bridge(model, checkpoint.bridge)
    first = checkpoint.bridge.config.first_layer
    hidden = lower_hidden(model, torch.randint(0, 40, (30,)).tolist(), first)
    rows = torch.tensor([3, 17, 18, 19, 29])

    def run(subset):
        checkpoint.bridge.zero_grad()
        state = BridgeState(checkpoint.bridge, torch.randn(1, 32, generator=torch.Generator().manual_seed(2)), [10])
        with handle.activate(state):
            out = upper_hidden(model, hidden, first, rows=rows) if subset else upper_hidden(model, hidden, first)[:, rows]
        out.pow(2).sum().backward()
        return out.detach(), [p.grad.clone() for p in checkpoint.bridge.parameters() if p.grad is not None]

    full, full_grads = run(subset=False)
    part, part_grads = run(subset=True)
    assert part.shape == (1, len(rows), model.config.hidden_size)
    torch.testing.assert_close(part, full, atol=1e-5, rtol=1e-5)
    assert len(part_grads) == len(full_grads) > 0
    for a, b in zip(part_grads, full_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_resume_equals_uninterrupted(tmp_path):
    from senab.experiment import prepare_data

    data = prepare_data(make_tiny_tokenizer(), dataclasses.replace(SMALL_DATA, state_windows=3))
    config = TrainConfig(steps=4, checkpoint_every=2, state_batch=2)

    def trainer(out):
        return Trainer(load_tiny().model, make_tiny_tokenizer(), data.train, config, out, state_windows=data.state,
                       progress=False)

    straight = trainer(tmp_path / "a")
    straight.train()

    first = trainer(tmp_path / "b")
    first.train(until=2)
    resumed = trainer(tmp_path / "b")
    resumed.resume(latest_step_dir(tmp_path / "b"))
    resumed.train()

    for (name, a), (_, b) in zip(straight._named_trainable(), resumed._named_trainable()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    assert [r.loss for r in resumed.result.history] == pytest.approx([r.loss for r in straight.result.history])


def test_state_pool_holds_negative_share():
    def window(valences):
        w = Window(conversation_id="c", ids=[0])
        w.turns = [EncodedTurn(user_start=0, reply_start=0, reply_end=1, valence=v) for v in valences]
        return w

    candidates = [window([0.5, 0.1])] * 6 + [window([0.2, -0.6]), window([0.0, 0.3]), window([-0.31, 0.0])]
    picked = pick_with_negatives(iter(candidates), 4, 0.5)

    assert len(picked) == 4
    assert [min(t.valence for t in w.turns) <= NEGATIVE_VALENCE for w in picked] == [True, True, False, False]
    # Only two negative windows exist: the third place goes to the first other one.
    assert pick_with_negatives(iter(candidates), 3, 1.0) == [candidates[6], candidates[8], candidates[0]]
    assert pick_with_negatives(iter(candidates), 0, 0.5) == []


def test_state_losses_follow_their_definitions():
    model, tokenizer = make_tiny_llama(seed=0)
    checkpoint = new_checkpoint(model.config)
    window = encode_window(tokenizer, "c", [("I love this!", "Great."), ("This is awful.", "Sorry.")], [0.6, -0.5])
    hidden = lower_hidden(model, window.ids, checkpoint.bridge.config.first_layer)
    probe = torch.nn.Linear(32, 1)
    law = Homeostasis(0.6, 0.3)

    result = state_losses(checkpoint, probe, window, hidden, law, arousal_distance=2.0)

    set_point = checkpoint.bridge.set_point
    distances = [(s - set_point).norm() for s in result.states]
    expected_arousal = sum((d / 2.0 - abs(t.valence)) ** 2 for d, t in zip(distances, window.turns)) / 2
    expected_valence = sum((torch.tanh(probe(s)) - t.valence) ** 2 for s, t in zip(result.states, window.turns)) / 2
    torch.testing.assert_close(result.arousal_loss, expected_arousal, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.valence_loss, expected_valence.squeeze(), atol=1e-5, rtol=0)
    torch.testing.assert_close(result.states[0], set_point + 0.6 * (result.readouts[0] - set_point), atol=1e-6, rtol=0)
    result.arousal_loss.backward()
    assert checkpoint.bridge.read_in.weight.grad.abs().sum() > 0


def test_resume_rejects_other_config(tmp_path):
    from senab.experiment import prepare_data

    data = prepare_data(make_tiny_tokenizer(), SMALL_DATA)
    trainer = Trainer(load_tiny().model, make_tiny_tokenizer(), data.train, TrainConfig(steps=2, checkpoint_every=2),
                      tmp_path, progress=False)
    trainer.train()
    other = Trainer(load_tiny().model, make_tiny_tokenizer(), data.train, TrainConfig(steps=3, checkpoint_every=2),
                    tmp_path, progress=False)

    with pytest.raises(ValueError, match="another training configuration"):
        other.resume(latest_step_dir(tmp_path))


def test_pipeline_end_to_end(tmp_path):
    finals = run(load_tiny, ["senab", "lora", "ia3"], tmp_path / "run", dataclasses.replace(SMALL_DATA, state_windows=2),
                 TrainConfig(steps=3, checkpoint_every=3, state_batch=1), progress=False)
    report = evaluate_run(load_tiny, tmp_path / "run", tmp_path / "docs", command="test", progress=False)

    checkpoint = load_checkpoint(finals["senab"])
    manifest = json.loads((finals["senab"] / "manifest.json").read_text())
    assert checkpoint.trained
    assert checkpoint.probe is not None
    assert manifest["checkpoint_id"] == checkpoint.checkpoint_id
    assert 0 <= manifest["homeostasis"]["alpha"] + manifest["homeostasis"]["beta"] <= 1
    assert (finals["lora"] / "adapter" / "adapter_config.json").exists()
    assert [m.name for m in report.methods] == ["base", "SENAB", "LoRA r=32", "IA3"]
    assert all(m.perplexity > 1 for m in report.methods)
    text = (tmp_path / "docs" / "evaluation.md").read_text()
    assert "| SENAB | 22,025 |" in text
    for plot in ("training-loss.png", "method-costs.png", "affect-trajectory.png", "state-trajectory-3d.png",
                 "style-jump.png", "style-scatter.png", "nca-growth.png"):
        assert (tmp_path / "docs" / plot).stat().st_size > 1000, plot
        assert f"]({plot})" in text, plot
    assert -1 <= report.senab["valence_r"] <= 1
    for method in report.methods:
        assert -1 <= method.semantic_similarity <= 1, method.name
        assert 0 <= method.rouge_l <= 1, method.name
        assert set(method.qa_by_kind) == {"fact", "arithmetic", "definition", "instruction"}
    answered = json.loads((tmp_path / "docs" / "samples" / "qa-senab.json").read_text())
    assert len(answered) == 32 and all(set(a) >= {"question", "reply", "rouge_l"} for a in answered)
    assert "| QA semantic similarity | QA ROUGE-L F1 |" in text
    assert "## The original's reported effects, checked here" in text
    assert len(report.senab["style_jump"]) == 6
    assert report.senab["style_jump"][0]["style"] == "academic"


def test_distinct_n_and_silhouette():
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    points = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]]).numpy()
    assert silhouette(points, ["x", "x", "y", "y"]) > 0.9
    assert silhouette(points, ["x", "y", "x", "y"]) < 0


def test_shipped_checkpoint_matches_manifest():
    shipped = Path(__file__).resolve().parents[2] / "senab" / "weights"
    directories = [d for d in shipped.iterdir() if (d / "manifest.json").exists()] if shipped.exists() else []
    if not directories:
        pytest.skip("no checkpoint shipped in senab/weights yet")
    for directory in directories:
        checkpoint = load_checkpoint(directory)  # verifies the weights against the manifest's id
        manifest = json.loads((directory / "manifest.json").read_text())
        assert checkpoint.checkpoint_id == manifest["checkpoint_id"]
        assert manifest["trained"] is True
        assert manifest["trainable_parameters"] <= 64_000
