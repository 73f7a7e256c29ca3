"""Question-answering scores: the question set, the two metrics, and greedy answering."""

import pytest

from senab.generation import Generator
from senab.qa import QA_PAIRS, QAPair, QAScorer, answer_questions
from tests.helpers import make_tiny_llama


@pytest.fixture(scope="module")
def scorer():
    return QAScorer()


def test_question_set_kinds_unique():
    assert len(QA_PAIRS) >= 30
    assert {p.kind for p in QA_PAIRS} == {"fact", "arithmetic", "definition", "instruction"}
    assert len({p.question for p in QA_PAIRS}) == len(QA_PAIRS)
    assert all(p.reference.strip() for p in QA_PAIRS)


def test_rouge_l_stemmed_subsequence(scorer):
    reference = "The capital of France is Paris."
    # Common subsequence "the capital of france": 4 of 6 words on both sides.
    assert scorer.rouge_l(["Paris is the capital of France."], [reference]) == [pytest.approx(4 / 6)]
    assert scorer.rouge_l([reference], [reference]) == [pytest.approx(1.0)]
    # Porter stemming: "jumps" and "jumping" share a stem.
    assert scorer.rouge_l(["the fox jumping"], ["the fox jumps"]) == [pytest.approx(1.0)]
    assert scorer.rouge_l([""], [reference]) == [0.0]


def test_similarity_ranks_paraphrase_first(scorer):
    reference = "The capital of France is Paris."
    same, paraphrase, unrelated = scorer.semantic_similarity(
        [reference, "Paris is France's capital city.", "I enjoy playing the violin on Sundays."], [reference] * 3)
    assert same == pytest.approx(1.0, abs=1e-5)
    assert paraphrase > 0.8
    assert unrelated < 0.3


def test_scores_average_by_kind(scorer):
    pairs = [QAPair("fact", "q1", "Water boils at 100 degrees."), QAPair("fact", "q2", "Mars is red."),
             QAPair("arithmetic", "q3", "2 plus 2 is 4.")]
    scores = scorer.score(["Water boils at 100 degrees.", "Nothing here.", "2 plus 2 is 4."], pairs)
    assert scores.by_kind["arithmetic"]["rouge_l"] == pytest.approx(1.0)
    assert scores.by_kind["fact"]["rouge_l"] == pytest.approx(0.5)
    assert scores.rouge_l == pytest.approx(2 / 3)
    assert scores.mean_words == pytest.approx((5 + 2 + 5) / 3)
    assert [q["reply"] for q in scores.per_question] == ["Water boils at 100 degrees.", "Nothing here.",
                                                         "2 plus 2 is 4."]
    with pytest.raises(ValueError, match="2 replies for 3 questions"):
        scorer.score(["a", "b"], pairs)


def test_greedy_answers_ignore_batch(scorer):
    model, tokenizer = make_tiny_llama(seed=3)
    generator = Generator(model, tokenizer)
    pairs = QA_PAIRS[:6]
    batched = answer_questions(generator, tokenizer, pairs, max_tokens=8, batch_size=6)
    alone = answer_questions(generator, tokenizer, pairs, max_tokens=8, batch_size=1)
    assert batched == alone
    assert any(batched)
    scores = scorer.score(batched, pairs)
    assert 0 <= scores.rouge_l <= 1
    assert -1 <= scores.semantic_similarity <= 1
