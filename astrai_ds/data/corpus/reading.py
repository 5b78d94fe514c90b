"""Reading comprehension: conversations in the grounded-question format of `astrai_ds.data.chat.rag_messages`
(numbered chunks, then a question) whose answers are copied from the chunks, and the same articles as pretraining
text followed by their questions and answers. Together they teach the model to answer from its context.

A conversation holds the section that states the first answer and 0 to 3 other sections, shuffled: sections of
the same article (the hard case: the right entity, the wrong attribute) and of other articles (irrelevant), as a
retriever's top chunks would be. Up to 3 more questions follow as later turns, each about a section in the
context, so one context trains several copies.

The conversations use the corpus's training articles and generated drills (`documents.drill_articles`), whose
names come back with other facts: their answers can only be read, not remembered. The pretraining texts are the
training articles. Held-out articles never appear here: `rag eval` measures on them.
"""

from __future__ import annotations

import random

from astrai_ds.data.chat import rag_messages
from astrai_ds.data.corpus.documents import Article

READING_CONVERSATIONS = 1_000  # SFT conversations at scale 1.0
CONTEXT_SIZES = (1, 2, 3, 4)  # chunks in the prompt, the answer's section included
CONTEXT_WEIGHTS = (0.15, 0.2, 0.35, 0.3)
MAX_TURNS = 4  # questions in one conversation


def reading_records(articles: list[Article], n: int, seed: int = 0) -> list[dict]:
    """`n` {"messages": [system, user (chunks and question), assistant (the exact answer), (user, assistant)...]}
    records over `articles`, taken in a shuffled order (cycling when n is larger)."""
    rng = random.Random(f"reading:{seed}")
    order = list(articles)
    rng.shuffle(order)
    sections = {a.id: a.sections() for a in articles}
    others = [s for a in articles for s in sections[a.id]]
    out = []
    for i in range(n):
        article = order[i % len(order)]
        qas = list(article.qa)
        rng.shuffle(qas)
        gold = article.answer_section(qas[0])
        size = rng.choices(CONTEXT_SIZES, CONTEXT_WEIGHTS)[0]
        same = [s for s in sections[article.id] if s != gold]
        chunks = [gold] + rng.sample(same, min(len(same), rng.randrange(size)))
        while len(chunks) < size:
            s = rng.choice(others)
            if s["source"] != gold["source"] and s not in chunks:
                chunks.append(s)
        rng.shuffle(chunks)
        messages = rag_messages(qas[0].question, chunks) + [{"role": "assistant", "content": qas[0].answer}]
        answerable = [qa for qa in qas[1:] if article.answer_section(qa) in chunks]
        for qa in answerable[: rng.randrange(MAX_TURNS)]:
            messages += [{"role": "user", "content": f"Question: {qa.question}"},
                         {"role": "assistant", "content": qa.answer}]
        out.append({"messages": messages})
    return out


def reading_texts(articles: list[Article], seed: int = 0) -> list[str]:
    """Each article followed by its questions and answers in a shuffled order, as pretraining text."""
    rng = random.Random(f"reading-texts:{seed}")
    out = []
    for a in articles:
        qas = list(a.qa)
        rng.shuffle(qas)
        out.append(a.text + "\n" + "\n".join(f"Question: {qa.question}\nAnswer: {qa.answer}" for qa in qas))
    return out


def reading_eval_records(articles: list[Article]) -> list[dict]:
    """One {"messages": [system, user], "answer", "lang", "id"} per question of the held-out `articles`: the section
    that states the answer alone in the grounded prompt, as `astrai-ds rag eval` asks its oracle questions (lm-eval's
    reading-comprehension task)."""
    return [{"messages": rag_messages(qa.question, [a.answer_section(qa)]), "answer": qa.answer, "lang": a.lang,
             "id": a.id} for a in articles for qa in a.qa]
