"""The built-in bilingual corpus: short, verifiable facts in English and Chinese, generated from a seed.

No download. Modules, bottom-up:

- `words`: the word tables (units, weekdays, months, words and their translations, antonyms);
- `facts`: the task registry (`TASKS`); a task generates every rendering of its facts as `Fact` records,
  2-3 phrasings in each language per fact;
- `split`: the seeded split that holds some renderings out of training for evaluation (whole facts for
  open-set tasks, single phrasings for closed-set ones), and even sampling over facts;
- `chat_forms`: every rendering as a question with a "plain" and a "full" answer: SFT conversations, DPO
  pairs, GRPO questions and their evaluation sets;
- `documents`: Markdown articles about fictional entities (countries, people, products) with questions and exact
  answers, split by entity, for retrieval;
- `reading`: reading-comprehension conversations on the training articles (chunks, then a question);
- `write`: `write_corpus`, the files `pretrain.jsonl`, `pretrain_eval.jsonl`, `sft.jsonl`, `sft_eval.jsonl`,
  `dpo.jsonl`, `dpo_eval.jsonl`, `grpo.jsonl`, `grpo_eval.jsonl`, `documents.jsonl`, `documents_eval.jsonl` and
  `reading.jsonl`.

Scoring a model's answers to the chat evaluation set is evaluation's job: `astrai_ds.inference.scoring`.
"""

from astrai_ds.data.corpus.chat_forms import (DPO_PAIRS, GRPO_PROMPTS, JUSTIFY, PREFERRED_STYLE, QUESTIONS,
                                              SFT_CONVERSATIONS, STYLES, ChatItem, chat_item, dpo_eval_records,
                                              dpo_records, grpo_records, sft_eval_records, sft_records)
from astrai_ds.data.corpus.facts import END, LANGS, SEP, TASKS, Fact, Task, task_facts
from astrai_ds.data.corpus.split import EVAL_PER_TASK_LANG, FactSplit, split_facts
from astrai_ds.data.corpus.write import (DOCUMENTS_EVAL_FILE, DOCUMENTS_FILE, DPO_EVAL_FILE, DPO_FILE, EVAL_FILE,
                                         GRPO_EVAL_FILE, GRPO_FILE, PRETRAIN_FILE, SFT_EVAL_FILE, SFT_FILE,
                                         write_corpus)

__all__ = [
    "DOCUMENTS_EVAL_FILE", "DOCUMENTS_FILE", "DPO_EVAL_FILE", "DPO_FILE", "DPO_PAIRS", "END", "EVAL_FILE",
    "EVAL_PER_TASK_LANG", "GRPO_EVAL_FILE", "GRPO_FILE", "GRPO_PROMPTS", "JUSTIFY", "LANGS", "PREFERRED_STYLE",
    "PRETRAIN_FILE", "QUESTIONS", "SEP", "SFT_CONVERSATIONS", "SFT_EVAL_FILE", "SFT_FILE", "STYLES", "TASKS",
    "ChatItem", "Fact", "FactSplit", "Task", "chat_item", "dpo_eval_records", "dpo_records", "grpo_records",
    "sft_eval_records", "sft_records", "split_facts", "task_facts", "write_corpus",
]
