"""GRPO's rewards: functions that score a generated response, loaded by name from the config's `grpo.rewards`
({name: weight}), and their weighted sum.

A reward function takes `(prompt, response, record)`: the prompt's chat messages (`data.prompts.prompt_messages`),
the generated text, and the whole JSONL record (its "answer" and anything else it holds); it returns a number,
a bool counting as 0 or 1. Names:

- built-ins (`BUILTINS`): "exact", the right value, scored as the chat exact match of `astrai-ds eval --chat`
  scores it; "format", the record's preferred answer style; "contains", the right value anywhere in the response,
  as `astrai-ds eval --chat` counts chat_contains (see `exact_reward`, `format_reward` and `contains_reward`);
- "module:function": a function in an importable module (the working directory is on the path for the import);
- "path/to/file.py:function": a function in a Python file (relative to the working directory).

A mistake in the names or weights is a ConfigError naming the key and the reward, before training starts; a
function that fails or returns something other than a finite number while scoring is a RewardError naming the
function and the record, so that a run stops with one line rather than a traceback.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import numbers
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from astrai_ds.config.base import did_you_mean
from astrai_ds.data.corpus import JUSTIFY, PREFERRED_STYLE
from astrai_ds.errors import ConfigError, UserError
from astrai_ds.inference.scoring import answer_contained, answer_style, chat_answer_correct

RewardFn = Callable[[list, str, dict], object]  # (prompt messages, response, record) -> a number
USER_NAMES = "a function of yours is named 'module:function' or 'path/to/file.py:function'"
_NUMBER = re.compile(r"[-+]?\d+(\.\d+)?([eE][-+]?\d+)?")
_CJK = re.compile(r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]")  # CJK punctuation, ideographs, full-width forms


class RewardError(UserError):
    """A reward function failed, or returned something other than a finite number, while scoring a response."""


@dataclass(frozen=True)
class Reward:
    name: str  # as named in grpo.rewards: a built-in, "module:function" or "path/to/file.py:function"
    fn: RewardFn
    weight: float  # its share of the total reward

    @property
    def metric(self) -> str:
        """Its name in the logs (grpo/reward/NAME): a built-in's name, else MODULE.FUNCTION (a file's stem)."""
        if ":" not in self.name:
            return self.name
        where, function = self.name.rsplit(":", 1)
        return f"{Path(where).stem if where.endswith('.py') else where}.{function}"


# ---------------------------------------------------------------- built-ins


def _lang(prompt: list, record: dict) -> str:
    """The record's "lang" where it is one we know, else "zh" when the question holds Chinese, else "en"."""
    if record.get("lang") in JUSTIFY:
        return record["lang"]
    question = prompt[-1].get("content") if prompt and isinstance(prompt[-1], dict) else None
    return "zh" if isinstance(question, str) and _CJK.search(question) else "en"


def _scored(prompt: list, response: str, record: dict) -> dict:
    """The record as the chat scoring reads it: {"answers", "lang", ...}. A record without "answers" (one of
    yours) gets {"plain": value, "full": value} from its "answer": a string as it is (without surrounding
    spaces); a number as the response writes it when the response's value is that number ("68", "68.0" and
    "6.8e1" are all 68), else as Python writes it; any other JSON value as JSON writes it ("true", "[1, 2]")."""
    lang = _lang(prompt, record)
    answers = record.get("answers")
    if answers is not None:
        if not (isinstance(answers, dict) and isinstance(answers.get("plain"), str)):
            raise ValueError("the record's 'answers' is not an object with a 'plain' string")
        return {**record, "lang": lang}
    answer = record.get("answer")
    if answer is None:
        raise ValueError("the record has no 'answer'")
    if isinstance(answer, str):
        plain = answer.strip()
    elif isinstance(answer, (int, float)) and not isinstance(answer, bool):
        value = response.strip().partition(JUSTIFY[lang])[0]  # the value part, as scoring splits a response
        plain = value if _NUMBER.fullmatch(value) and float(value) == answer else str(answer)
    else:
        plain = json.dumps(answer, ensure_ascii=False)
    return {**record, "answers": {"plain": plain, "full": plain}, "lang": lang}


def exact_reward(prompt: list, response: str, record: dict) -> float:
    """1.0 when the response gives the right value, as `astrai-ds eval --chat` counts it (`chat_answer_correct`):
    the value alone, or the value followed by a one-sentence justification ("68" or "68. 23 + 45 = 68.", the
    value and the sentence joined by ". " in English, "。" in Chinese: the record's "lang", else the question's
    script), else 0.0. The value is the record's "answers"["plain"], or its "answer" (see `_scored`). A bare value
    is one word, as every answer of the built-in corpus is: an answer with spaces in it scores 0 every time."""
    return float(chat_answer_correct(response, _scored(prompt, response, record)))


def format_reward(prompt: list, response: str, record: dict) -> float:
    """1.0 when the response's style (`answer_style`: "plain", a bare value; "full", a value and a one-sentence
    justification; or "other") is the record's "preferred" one ("full" where it names none), right or wrong."""
    style = answer_style(response, _scored(prompt, response, record))
    return float(style == record.get("preferred", PREFERRED_STYLE))


def contains_reward(prompt: list, response: str, record: dict) -> float:
    """1.0 when the right value (as `exact_reward` reads it) appears anywhere in the response, case and runs of
    whitespace aside, as `astrai-ds eval --chat` counts chat_contains; else 0.0. Partial credit for a model that
    answers in sentences ("The sum of 23 and 45 is 68."), whose value is rarely first: with `exact` alone, every
    completion of such a model scores 0 and every group's advantages are zero."""
    return float(answer_contained(response, _scored(prompt, response, record)["answers"]["plain"]))


BUILTINS: dict[str, RewardFn] = {"exact": exact_reward, "format": format_reward, "contains": contains_reward}


# ---------------------------------------------------------------- loading by name


def _brief(e: BaseException) -> str:
    """An exception in a few words: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    text = text[0] if text else ""
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextmanager
def _on_sys_path(folder: str):
    """`folder` first on sys.path while the block runs (as `python -m` puts the working directory there)."""
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def _import_module(module: str, what: str):
    cwd = os.getcwd()
    try:
        with _on_sys_path(cwd):
            return importlib.import_module(module)
    except Exception as e:
        raise ConfigError(f"{what}: cannot import module {module!r} ({_brief(e)}; the working directory "
                          f"{cwd} is on the path)") from None


def _import_file(file: str, what: str):
    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"{what}: no file {file} (relative to the working directory {os.getcwd()})")
    path = path.resolve()
    # One module per file, under a name of its own: two rewards from one file share it, and dataclasses or pickle
    # inside it find their module in sys.modules.
    name = f"_astrai_ds_reward_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{what}: {file} cannot be loaded as Python (name it with a .py suffix)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with _on_sys_path(str(path.parent)):  # the file may import its neighbours
            spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ConfigError(f"{what}: cannot load {file} ({_brief(e)})") from None
    return module


def _user_function(name: str, what: str) -> RewardFn:
    """The function `name` ("module:function" or "path/to/file.py:function") names."""
    source, _, attr = name.rpartition(":")
    if not source or not attr:
        raise ConfigError(f"{what}: name a function after the ':'; {USER_NAMES}")
    is_file = source.endswith(".py") or "/" in source or os.sep in source
    module = _import_file(source, what) if is_file else _import_module(source, what)
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ConfigError(f"{what}: {source} has no {attr!r}{did_you_mean(part, dir(fn))}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ConfigError(f"{what}: {source}'s {attr!r} is not a function of (prompt, response, record) but "
                          f"{type(fn).__name__}")
    return fn


def load_rewards(spec: dict[str, float], key: str = "grpo.rewards") -> list[Reward]:
    """The rewards of a {name: weight} spec, in its order; raises ConfigError in one line naming `key` and the
    reward for an empty spec, an unknown built-in, a function that cannot be found or called, or a weight that is
    not a finite number."""
    builtins = ", ".join(BUILTINS)
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"{key} is {'empty' if isinstance(spec, dict) else type(spec).__name__}: give an object "
                          f"of reward names and weights, e.g. {{\"exact\": 1.0, \"format\": 0.5}} (built-ins: "
                          f"{builtins}; {USER_NAMES})")
    rewards = []
    for name, weight in spec.items():
        what = f"{key}: reward {name!r}"
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{what}: a name must be a non-empty string (built-ins: {builtins}; {USER_NAMES})")
        if ":" in name:
            fn = _user_function(name, what)
        elif name in BUILTINS:
            fn = BUILTINS[name]
        else:
            raise ConfigError(f"{key}: unknown reward {name!r}{did_you_mean(name, BUILTINS)}: the built-ins are "
                              f"{builtins}; {USER_NAMES}")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise ConfigError(f"{what}: its weight {weight!r} is not a finite number")
        rewards.append(Reward(name, fn, float(weight)))
    return rewards


# ---------------------------------------------------------------- scoring


def _number(value, reward: Reward, where: str) -> float:
    if getattr(value, "shape", None) == () and callable(getattr(value, "item", None)):
        value = value.item()  # a NumPy scalar or a 0-d tensor
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real) and math.isfinite(value):
        return float(value)
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise RewardError(f"reward {reward.name!r} returned {shown} ({type(value).__name__}) on {where}: a reward must be "
                      f"a finite number (or a bool)")


def score(rewards: list[Reward], prompt: list, response: str, record: dict,
          where: str) -> tuple[float, dict[str, float]]:
    """(the weighted sum of the rewards, {name: raw value}) of one response. `where` names the record for an error
    ("data/grpo.jsonl line 12"): a function that raises, or returns something other than a finite number, is a
    RewardError naming the function, `where` and the exception or the value."""
    values = {}
    for reward in rewards:
        try:
            value = reward.fn(prompt, response, record)
        except Exception as e:
            raise RewardError(f"reward {reward.name!r} failed on {where}: {_brief(e)}") from e
        values[reward.name] = _number(value, reward, where)
    return sum(r.weight * values[r.name] for r in rewards), values
