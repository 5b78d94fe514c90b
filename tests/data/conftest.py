import json

import pytest

from astrai_ds.data.corpus import write_corpus
from astrai_ds.data.tokenizer import Tokenizer, train_tokenizer

CORPUS_SCALE = 0.1  # 4,500 sentences: enough to see every task, fast to write

# A small bilingual corpus: enough pairs to fill a 512-token vocabulary in well under a second.
SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "苹果的中文是苹果。我们今天去公园散步，天气很好。",
    "23 + 45 = 68. The larger of 37 and 52 is 52.",
    "星期一的后一天是星期二。五千米等于5000米。",
    "Tokenizers split text into pieces; emoji 😀 and café stay intact.",
    "机器学习模型需要大量的数据来训练，中文和英文都很重要。",
]


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokcorpus")
    txt = d / "a.txt"
    txt.write_text("\n".join(SAMPLE_TEXTS * 20) + "\n\n", encoding="utf-8")
    jsonl = d / "b.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in SAMPLE_TEXTS * 20),
                     encoding="utf-8")
    return [txt, jsonl]


@pytest.fixture(scope="session")
def tokenizer_dir(corpus_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(corpus_files, 512, out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return Tokenizer.load(tokenizer_dir)


def _write_corpus(tmp_path_factory, name: str, seed: int):
    out = tmp_path_factory.mktemp(name)
    return out, write_corpus(out, seed=seed, scale=CORPUS_SCALE)


@pytest.fixture(scope="session")
def corpus_seed0(tmp_path_factory):
    """(folder, summary) of the built-in corpus at CORPUS_SCALE with seed 0, read by the corpus tests."""
    return _write_corpus(tmp_path_factory, "corpus_seed0", 0)


@pytest.fixture(scope="session")
def corpus_seed0_again(tmp_path_factory):
    """The same corpus written a second time, on its own: what the determinism tests compare."""
    return _write_corpus(tmp_path_factory, "corpus_seed0_again", 0)


@pytest.fixture(scope="session")
def corpus_seed1(tmp_path_factory):
    return _write_corpus(tmp_path_factory, "corpus_seed1", 1)
