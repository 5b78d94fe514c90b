"""Documents about fictional entities, for retrieval: short Markdown articles in English and Chinese whose facts
appear nowhere else in the corpus, each with questions and their exact answers.

Every entity (a country, a person or a product) gets a made-up name (syllables with a fixed Chinese
transliteration each) and a few attributes drawn with a seed; its article states them under headings, in one
language. A model can answer a question about a held-out article only by reading it: nothing in the training
text mentions the entity. `split_articles` holds out whole entities.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from astrai_ds.data.corpus.words import WORDS

# (English, Chinese) syllables: a name's two transliterations always match.
SYLLABLES = [("va", "瓦"), ("lo", "洛"), ("ri", "里"), ("ta", "塔"), ("ren", "伦"), ("mi", "米"), ("ko", "科"),
             ("sa", "萨"), ("del", "德尔"), ("no", "诺"), ("bi", "比"), ("ka", "卡"), ("lu", "鲁"), ("se", "塞"),
             ("ran", "兰"), ("tu", "图"), ("pe", "佩"), ("mo", "莫"), ("zan", "赞"), ("fi", "菲"), ("gor", "戈尔"),
             ("hel", "赫尔"), ("dra", "德拉"), ("ven", "文")]
# Syllables of the generated reading drills: none of the articles' syllables, in either language, so a drill never
# names an entity of the corpus.
DRILL_SYLLABLES = [("ba", "巴"), ("ga", "加"), ("jo", "乔"), ("ki", "基"), ("ni", "尼"), ("ha", "哈"), ("ji", "吉"),
                   ("so", "索"), ("wen", "温"), ("po", "波"), ("da", "达"), ("ya", "雅"), ("ku", "库"), ("be", "贝"),
                   ("ma", "玛"), ("lin", "琳"), ("pu", "普"), ("xi", "希"), ("za", "扎"), ("qu", "曲")]
PROFESSIONS = [("painter", "画家"), ("engineer", "工程师"), ("sailor", "水手"), ("baker", "面包师"),
               ("astronomer", "天文学家"), ("composer", "作曲家"), ("gardener", "园丁"), ("architect", "建筑师")]
COLOURS = [("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"), ("white", "白色"),
           ("black", "黑色"), ("silver", "银色"), ("purple", "紫色")]
GOODS = [w for w in WORDS if w[0] in ("tea", "rice", "salt", "sugar", "fish", "bread", "coffee", "milk", "paper",
                                      "stone", "music", "honey", "boat", "bicycle", "clock", "shoe", "hat")]
KINDS = ("country", "person", "product")


@dataclass(frozen=True)
class QA:
    question: str
    answer: str  # exactly as the article writes it


@dataclass(frozen=True)
class Article:
    id: str
    kind: str  # country, person or product
    lang: str  # en or zh
    title: str
    text: str  # Markdown, with headings
    qa: tuple[QA, ...]

    def record(self, split: str) -> dict:
        return {"id": self.id, "kind": self.kind, "lang": self.lang, "title": self.title, "text": self.text,
                "split": split, "qa": [{"question": q.question, "answer": q.answer} for q in self.qa]}

    def sections(self) -> list[dict]:
        """The article cut at its headings, as retrieval chunks ({"source", "headings", "text"}): each heading line
        starts a section that runs to the next one. These are the chunks `astrai_ds.rag.chunking` makes of the
        article when a section fits its token limit (tested), so reading-comprehension training sees what
        retrieval will give."""
        out, path = [], []
        for line in self.text.splitlines(keepends=True):
            if line.startswith("#"):
                level = len(line) - len(line.lstrip("#"))
                path = path[: level - 1] + [line.strip("# \n")]
                out.append({"source": f"{self.id}.md", "headings": list(path), "text": ""})
            out[-1]["text"] += line
        return out

    def answer_section(self, qa: QA) -> dict:
        """The first section that states the answer."""
        return next(s for s in self.sections() if qa.answer in s["text"])


class _Names:
    """Made-up names, as (English, Chinese), none inside another (in either language, ignoring case): a name
    found in a text is that entity and no other."""

    def __init__(self, rng: random.Random):
        self.rng, self.count = rng, 0
        # per language: the names used, and every substring of them (a new name inside a used one is in the latter)
        self.used: tuple[set[str], set[str]] = (set(), set())
        self.inside: tuple[set[str], set[str]] = (set(), set())

    def _clashes(self, name: str, lang: int) -> bool:
        """`name` is inside a used name, or a used name is inside `name`."""
        return name in self.inside[lang] or not self.used[lang].isdisjoint(_substrings(name))

    def __call__(self, parts: int) -> tuple[str, str]:
        for attempt in range(100_000):
            length = parts + attempt // 1000  # when the short names run out, longer ones
            picked = [self.rng.choice(SYLLABLES) for _ in range(length)]
            en, zh = "".join(s for s, _ in picked), "".join(z for _, z in picked)
            if not (self._clashes(en, 0) or self._clashes(zh, 1)):
                for lang, name in enumerate((en, zh)):
                    self.used[lang].add(name)
                    self.inside[lang].update(_substrings(name))
                self.count += 1
                return en.capitalize(), zh
        raise ValueError(f"no new name left after {self.count} names: ask for fewer articles (up to about 500)")


def _substrings(text: str) -> set[str]:
    return {text[i:j] for i in range(len(text)) for j in range(i + 1, len(text) + 1)}


class _DrillNames:
    """Random names of 2-3 drill syllables; they repeat across drills, so a drill's facts can only be read, not
    remembered."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def __call__(self, parts: int) -> tuple[str, str]:
        picked = [self.rng.choice(DRILL_SYLLABLES) for _ in range(parts + self.rng.randrange(2))]
        return "".join(s for s, _ in picked).capitalize(), "".join(z for _, z in picked)


def _country(i, rng, names, lang) -> Article:
    name, capital, currency = names(3), names(2), names(2)
    population, founded = rng.randrange(2, 90), rng.randrange(1500, 1990)
    good = rng.choice(GOODS)
    if lang == "en":
        n = name[0]
        text = (f"# {n}\n\n{n} is a country by the sea. Its capital is {capital[0]}.\n\n## History\n\n"
                f"{n} was founded in {founded}. About {population} million people live there today.\n\n"
                f"## Economy\n\nThe currency of {n} is the {currency[0].lower()}. Its best-known export is "
                f"{good[0]}.\n")
        qa = (QA(f"What is the capital of {n}?", capital[0]), QA(f"In which year was {n} founded?", str(founded)),
              QA(f"What is the currency of {n}?", currency[0].lower()),
              QA(f"How many million people live in {n}?", str(population)),
              QA(f"What is the best-known export of {n}?", good[0]))
    else:
        n = name[1]
        text = (f"# {n}\n\n{n}是一个靠海的国家。它的首都是{capital[1]}。\n\n## 历史\n\n{n}建于{founded}年。"
                f"如今约有{population}百万人生活在那里。\n\n## 经济\n\n{n}的货币是{currency[1]}币。"
                f"它最有名的出口商品是{good[1]}。\n")
        qa = (QA(f"{n}的首都是哪里？", capital[1]), QA(f"{n}建于哪一年？", str(founded)),
              QA(f"{n}的货币是什么？", f"{currency[1]}币"), QA(f"{n}约有多少百万人？", str(population)),
              QA(f"{n}最有名的出口商品是什么？", good[1]))
    return Article(f"doc-{i:04d}", "country", lang, n, text, qa)


def _person(i, rng, names, lang) -> Article:
    name, home, invention = names(2), names(3), names(2)
    born = rng.randrange(1800, 1999)
    job = rng.choice(PROFESSIONS)
    if lang == "en":
        n = name[0]
        a = "an" if job[0][0] in "aeiou" else "a"
        text = (f"# {n}\n\n{n} was {a} {job[0]} born in {born}.\n\n## Life\n\n{n} grew up in {home[0]} and worked "
                f"there as {a} {job[0]} for many years.\n\n## Work\n\n{n} is remembered for inventing the "
                f"{invention[0].lower()} lamp.\n")
        qa = (QA(f"In which year was {n} born?", str(born)), QA(f"What was {n}'s profession?", job[0]),
              QA(f"Where did {n} grow up?", home[0]), QA(f"What did {n} invent?", f"the {invention[0].lower()} lamp"))
    else:
        n = name[1]
        text = (f"# {n}\n\n{n}是一位{job[1]}，生于{born}年。\n\n## 生平\n\n{n}在{home[1]}长大，多年来在那里"
                f"做{job[1]}。\n\n## 成就\n\n人们记得{n}发明了{invention[1]}灯。\n")
        qa = (QA(f"{n}生于哪一年？", str(born)), QA(f"{n}的职业是什么？", job[1]), QA(f"{n}在哪里长大？", home[1]),
              QA(f"{n}发明了什么？", f"{invention[1]}灯"))
    return Article(f"doc-{i:04d}", "person", lang, n, text, qa)


def _product(i, rng, names, lang) -> Article:
    name, maker = names(2), names(2)
    year, price = rng.randrange(1950, 2020), rng.randrange(10, 990)
    colour = rng.choice(COLOURS)
    if lang == "en":
        n = f"{name[0]} {rng.choice(['One', 'Max', 'Lite', 'Pro'])}"
        text = (f"# {n}\n\nThe {n} is a pocket radio made by {maker[0]} Works.\n\n## Release\n\nThe {n} came out "
                f"in {year}. It costs {price} coins.\n\n## Design\n\nThe {n} is {colour[0]}.\n")
        qa = (QA(f"Who makes the {n}?", f"{maker[0]} Works"), QA(f"When did the {n} come out?", str(year)),
              QA(f"How many coins does the {n} cost?", str(price)), QA(f"What colour is the {n}?", colour[0]))
    else:
        n = f"{name[1]}{rng.choice(['一号', '二号', '三号'])}"
        text = (f"# {n}\n\n{n}是{maker[1]}工坊制造的一款袖珍收音机。\n\n## 发布\n\n{n}于{year}年推出，"
                f"售价{price}枚硬币。\n\n## 设计\n\n{n}是{colour[1]}的。\n")
        qa = (QA(f"{n}是哪家工坊制造的？", f"{maker[1]}工坊"), QA(f"{n}是哪一年推出的？", str(year)),
              QA(f"{n}售价多少枚硬币？", str(price)), QA(f"{n}是什么颜色的？", colour[1]))
    return Article(f"doc-{i:04d}", "product", lang, n, text, qa)


def articles(n: int = 120, seed: int = 0) -> list[Article]:
    """`n` articles (up to about 500: then the names run out), the kinds and languages taking turns; the same seed
    gives the same articles."""
    rng = random.Random(f"documents-{seed}")
    names = _Names(rng)
    makers = {"country": _country, "person": _person, "product": _product}
    return [makers[KINDS[i % 3]](i, rng, names, ("en", "zh")[(i // 3) % 2]) for i in range(n)]


def drill_articles(n: int, seed: int = 0, avoid: list[Article] = ()) -> list[Article]:
    """`n` reading-drill articles: the same kinds, templates and questions as `articles`, about entities with random
    names of drill syllables, so the same name comes back with other facts. None of them contains the title of an
    article in `avoid` (the held-out ones)."""
    rng = random.Random(f"drills-{seed}")
    names = _DrillNames(rng)
    makers = {"country": _country, "person": _person, "product": _product}
    out = []
    while len(out) < n:
        i = len(out)
        drill = makers[KINDS[i % 3]](i, rng, names, ("en", "zh")[(i // 3) % 2])
        if not any(a.title in drill.text for a in avoid):
            out.append(Article(f"drill-{i:05d}", drill.kind, drill.lang, drill.title, drill.text, drill.qa))
    return out


def split_articles(docs: list[Article], heldout: float = 0.25, seed: int = 0) -> tuple[list[Article], list[Article]]:
    """(train, held-out): whole articles, about `heldout` of each kind and language held out."""
    rng = random.Random(f"documents-split-{seed}")
    train, held = [], []
    groups: dict[tuple[str, str], list[Article]] = {}
    for d in docs:
        groups.setdefault((d.kind, d.lang), []).append(d)
    for key in sorted(groups):
        group = list(groups[key])
        rng.shuffle(group)
        k = max(1, round(heldout * len(group))) if len(group) > 1 else 0
        held += group[:k]
        train += group[k:]
    order = {d.id: i for i, d in enumerate(docs)}
    return sorted(train, key=lambda d: order[d.id]), sorted(held, key=lambda d: order[d.id])
