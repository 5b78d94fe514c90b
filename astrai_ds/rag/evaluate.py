"""Measuring retrieval and grounded answers on documents with known questions (the corpus's `documents_eval.jsonl`:
records with a "text" and "qa": [{"question", "answer"}]), against an index built from those documents.

- `recall_at_k`, per search mode: the share of questions for which a chunk of the question's own document that
  states the answer is among the top k;
- `answer_em_closed_book`: the question alone, no context;
- `answer_em_rag`: the best `answer_k` retrieved chunks (as many as the context holds) in the grounded prompt;
- `answer_em_oracle`: the chunk that states the answer, alone in the grounded prompt.

An answer is exact (`answer_em_*`) when its value (the text before a first sentence end, so "Venlu. The capital of
... is Venlu." counts as "Venlu") is the expected answer; it contains the answer (`answer_contains_*`) when the
expected answer appears anywhere in the response, case and runs of whitespace aside (a model that answers in
sentences, "The Mimo Max came out in 2012.", is right by this measure and wrong by the first). The same fields are
given for each language of the documents apart (`"en"`, `"zh"`). The question's document is found in the index by
its content hash, so the index may have been built from another path to the same file.
"""

from __future__ import annotations

from pathlib import Path

from astrai_ds.data.chat import rag_messages
from astrai_ds.data.sources import iter_json_lines
from astrai_ds.errors import UserError
from astrai_ds.inference.scoring import answer_contained
from astrai_ds.rag.answer import fit_prompt
from astrai_ds.rag.documents import content_hash
from astrai_ds.rag.index import MODES


def read_questions(path: str | Path) -> list[dict]:
    """[{"sha256" (of the document's text), "question", "answer", "lang"}] from a .jsonl of documents with "qa"."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--docs {path}: no such file; give the .jsonl of documents with questions (the corpus's "
                        f"documents_eval.jsonl)")
    out = []
    for lineno, record in iter_json_lines(path):
        qa = record.get("qa") if isinstance(record, dict) else None
        well_formed = isinstance(qa, list) and all(
            isinstance(q, dict) and isinstance(q.get("question"), str) and isinstance(q.get("answer"), str) for q in qa)
        if not well_formed or not isinstance(record.get("text"), str):
            raise UserError(f"{path}:{lineno}: a record needs 'text' and 'qa': [{{'question', 'answer'}}] (strings)")
        sha = content_hash(record["text"])
        out += [{"sha256": sha, "question": q["question"], "answer": q["answer"], "lang": record.get("lang")}
                for q in qa]
    if not out:
        raise UserError(f"--docs {path}: no questions in it")
    return out


def answer_value(response: str) -> str:
    """The value a response gives: its text up to a first sentence end ('. ' or '。'), without a final full stop."""
    value = response.strip()
    for end in (". ", "。"):
        value = value.split(end, 1)[0]
    return value.rstrip(".。").strip()


ANSWERS = ("closed_book", "rag", "oracle")


def _scores(records: list[dict], k: int) -> dict:
    """recall at k per mode and the share of right answers (exact value; contained) of each kind, over `records`."""
    n = len(records)
    out = {"questions": n, f"recall_at_{k}": {m: sum(r[f"found_{m}"] for r in records) / n for m in MODES}}
    for name in ANSWERS:
        out[f"answer_em_{name}"] = sum(r[f"{name}_correct"] for r in records) / n
    for name in ANSWERS:
        out[f"answer_contains_{name}"] = sum(r[f"{name}_contains"] for r in records) / n
    return out


def evaluate_rag(index, embedder, engine, questions: list[dict], k: int = 5, answer_k: int = 3,
                 mode: str = "hybrid", max_new_tokens: int = 32, progress: bool = False) -> tuple[dict, list[dict]]:
    """(metrics, one record per question with the three answers). `mode` picks the chunks of the RAG answers."""
    from astrai_ds.inference.sampling import SamplingParams

    if mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    by_sha = {f["sha256"]: source for source, f in index.meta["files"].items()}
    missing = sum(q["sha256"] not in by_sha for q in questions)
    if missing:
        raise UserError(f"--index {index.path} lacks the documents of {missing} of the {len(questions)} questions: "
                        f"build it from the same documents (`astrai-ds rag index --docs FILE ...`)")

    def states_answer(chunk: dict, q: dict) -> bool:
        return chunk["source"] == by_sha[q["sha256"]] and q["answer"] in chunk["text"]

    rag_prompts, oracle_prompts, records = [], [], []
    tokenizer = engine.tokenizer
    vectors = embedder([q["question"] for q in questions])  # one batched pass, not one forward per question
    for i, q in enumerate(questions):
        record = {"question": q["question"], "answer": q["answer"], "lang": q["lang"]}
        for m in MODES:
            hits = index.search(q["question"], embedder, tokenizer, k, m, query=vectors[i:i + 1])
            record[f"found_{m}"] = any(states_answer(h.chunk, q) for h in hits)
            if m == mode:
                messages, used = fit_prompt(engine, q["question"], [h.chunk for h in hits[:answer_k]], max_new_tokens)
                rag_prompts.append(messages)
                record["rag_chunks"] = len(used)
        gold = next((c for c in index.chunks if states_answer(c, q)), None)
        if gold is None:
            raise UserError(f"--index {index.path}: no chunk of {by_sha[q['sha256']]} holds the answer "
                            f"{q['answer']!r} whole (a chunk boundary cuts it): index with a larger --max-tokens")
        oracle_prompts.append(fit_prompt(engine, q["question"], [gold], max_new_tokens)[0])
        records.append(record)

    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    closed = [rag_messages(q["question"], []) for q in questions]
    for name, prompts in zip(ANSWERS, (closed, rag_prompts, oracle_prompts)):
        completions = engine.generate_batch(prompts, params, progress=progress, desc=f"answers ({name})")
        for record, c in zip(records, completions):
            if c.error:
                raise UserError(f"answers ({name}): {c.error}")
            record[name] = c.text
            record[f"{name}_correct"] = answer_value(c.text) == record["answer"]
            record[f"{name}_contains"] = answer_contained(c.text, record["answer"])
    metrics = {"k": k, "answer_k": answer_k, "mode": mode, **_scores(records, k)}
    for lang in sorted({r["lang"] for r in records if isinstance(r["lang"], str)}):
        metrics[lang] = _scores([r for r in records if r["lang"] == lang], k)
    return metrics, records
