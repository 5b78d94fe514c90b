"""Scoring chat responses to held-out questions: the style of a response, its value, the whole response."""

from astrai_ds.inference.scoring import answer_style, chat_answer_correct, chat_response_exact

# An sft_eval record as the built-in corpus writes it (the chat form of "23 + 45 = 68.").
ADD = {"messages": [{"role": "user", "content": "What is 23 + 45?"}], "answer": "68",
       "answers": {"plain": "68", "full": "68. 23 + 45 = 68."},
       "full_forms": ["68. 23 + 45 = 68.", "68. 23 plus 45 equals 68.", "68. The sum of 23 and 45 is 68."],
       "preferred": "full", "task": "add", "lang": "en"}
ADD_ZH = {"messages": [{"role": "user", "content": "23加45等于多少？"}], "answer": "68",
          "answers": {"plain": "68", "full": "68。23加45等于68。"}, "full_forms": ["68。23加45等于68。"],
          "preferred": "full", "task": "add", "lang": "zh"}


def test_styles():
    assert answer_style(" 7. 23 + 45 = 7. ", ADD) == "full"  # wrong, but in the full style
    assert answer_style("68. 23 + 45 = 7.", ADD) == "full"  # a wrong justification is still one
    assert answer_style("7", ADD) == "plain" and answer_style("", ADD) == "other"
    assert answer_style("The answer is 7.", ADD) == "other"
    assert answer_style("23 + 45 = 68.", ADD) == "other"  # a statement without the value first
    assert answer_style("68. 23 + 45 = 68. 23 + 45 = 68.", ADD) == "other"  # two sentences
    assert answer_style("68。23加45等于68。", ADD_ZH) == "full" and answer_style("68", ADD_ZH) == "plain"
    for record in (ADD, ADD_ZH):
        for form in record["full_forms"]:
            assert answer_style(form, record) == "full" and chat_answer_correct(form, record)


def test_the_value_is_scored_apart_from_the_justification():
    # The answer is the value: right with or without a justification, and whatever the justification says;
    # the whole response is right only with a right justification, in any phrasing of the language.
    full = ADD["answers"]["full"]
    assert chat_answer_correct(" " + full + "\n", ADD) and chat_response_exact(" " + full + "\n", ADD)
    assert chat_answer_correct("68", ADD) and chat_response_exact("68", ADD)
    assert chat_response_exact("68. The sum of 23 and 45 is 68.", ADD)
    assert chat_answer_correct("68. 23 + 45 = 7.", ADD) and not chat_response_exact("68. 23 + 45 = 7.", ADD)
    assert not chat_answer_correct("7", ADD) and not chat_answer_correct("7. 23 + 45 = 7.", ADD)
    assert not chat_answer_correct("68 apples", ADD) and not chat_answer_correct("68. Yes. Yes.", ADD)
    assert chat_answer_correct("68。23加45等于7。", ADD_ZH) and not chat_response_exact("68。23加45等于7。", ADD_ZH)


def test_a_record_without_full_forms_accepts_its_full_answer():
    record = {k: v for k, v in ADD.items() if k != "full_forms"}
    assert chat_response_exact("68. 23 + 45 = 68.", record)
    assert not chat_response_exact("68. 23 plus 45 equals 68.", record)
