"""Text of the auto-interpretation eval: examples with their activating tokens marked, the prompts for the explainer
and the judge, the parsing of their answers (which never raises: an answer it cannot read is reported, and its
predictions count as wrong), and the scores of judged examples.

Marking follows Delphi: consecutive marked tokens share one `<<...>>` span (SAEBench marks every token on its own).
Line breaks show as `↵` and bytes of a split character (`�`) are dropped, as in SAEBench.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Collection, Sequence
from typing import Any

from saelab.evals.explainers import LLM, Message

OPEN, CLOSE = "<<", ">>"

EXPLAIN_SYSTEM = (
    "You study one feature of a language model: a unit that responds to certain tokens in text. You are shown "
    f"text excerpts in which the feature activates; the tokens it activates on are marked between {OPEN} and "
    f"{CLOSE}. The excerpts are ordered from the strongest activation to the weakest.\n"
    "Say in one short sentence (at most 20 words) what the marked tokens have in common, taking their context into "
    "account. Mention capitalisation, punctuation or position when they matter. Do not list the marked words one "
    "by one, and do not mention the markers.\n"
    "Answer in the form: This feature activates on ..."
)
DETECTION_SYSTEM = (
    "You are given the explanation of a feature of a language model and {n} numbered text excerpts. The feature "
    "activates on some of the excerpts and not on the others. Using the explanation, decide on which excerpts it "
    "activates (on at least one token).\n"
    "Answer with the numbers of those excerpts, separated by commas (for example: {example}), or with None if it "
    "activates on none of them. Answer with the numbers only."
)
FUZZING_SYSTEM = (
    "You are given the explanation of a feature of a language model and {n} numbered text excerpts. In each "
    f"excerpt some tokens are marked between {OPEN} and {CLOSE}. In some excerpts the marked tokens are exactly "
    "the ones the explanation describes; in the others they were marked at random.\n"
    "Answer with the numbers of the excerpts whose marks are right, separated by commas (for example: {example}), "
    "or with None if no excerpt is marked right. Answer with the numbers only."
)


def token_pieces(tokenizer, ids: Sequence[int], hidden: Collection[int] = ()) -> list[str]:
    """The text each token adds, in order ("" for ids < 0, i.e. beyond the context, and for `hidden` ids such
    as BOS, whose text, e.g. `<|im_start|>`, would garble a chat prompt). Decoding the growing prefix keeps the
    spaces a tokenizer adds between tokens and joins the bytes of characters split over tokens."""
    shown = [int(i) for i in ids if i >= 0 and int(i) not in hidden]
    pieces, previous = [], ""
    for n in range(1, len(shown) + 1):
        text = tokenizer.decode(shown[:n])
        common = 0
        while common < min(len(text), len(previous)) and text[common] == previous[common]:
            common += 1
        pieces.append(text[common:])
        previous = text
    it = iter(pieces)
    return [next(it) if i >= 0 and int(i) not in hidden else "" for i in ids]


def _clean(text: str) -> str:
    return text.replace("\ufffd", "").replace("\r", "").replace("\n", "↵")


def mark(pieces: Sequence[str], marked: Sequence[bool]) -> str:
    """The text of `pieces` with each run of consecutive `marked` pieces between << and >> (a leading space
    stays outside the marks)."""
    out, run = [], []
    for piece, on in zip([*pieces, ""], [*marked, False], strict=True):
        if on and piece:
            run.append(piece)
            continue
        if run:
            text = _clean("".join(run))
            stripped = text.lstrip()
            out.append(text[: len(text) - len(stripped)] + OPEN + stripped + CLOSE)
            run = []
        out.append(_clean(piece))
    return "".join(out).strip()


def numbered(examples: Sequence[str]) -> str:
    return "\n".join(f"{i}. {text}" for i, text in enumerate(examples, start=1))


# One made-up worked example of each judge question, shown first when `demos`: a small model then answers in that
# form. The explainer gets none (a small model repeats a demo explanation word for word); its answer is begun for it.
DEMO_EXPLANATION = "drinks, the names of liquids that people drink"
DEMO_DETECTION = (
    [
        "the train left the station at noon",
        "a cup of hot tea with lemon",
        "the report is due on Friday",
        "she ordered a glass of water",
    ],
    "2, 4",
)
DEMO_FUZZING = (
    [
        "a cup of hot <<tea>> with lemon",
        "the train <<left>> the station at noon",
        "she ordered a glass of <<water>>",
        "the <<report>> is due on Friday",
    ],
    "1, 3",
)


EXPLANATION_START = "This feature activates on"


def explanation_messages(examples: Sequence[str]) -> list[Message]:
    """The explainer's prompt for marked examples (strongest first). It ends with the start of the answer, which a
    local model continues (an endpoint is asked for the same form by the instructions)."""
    return [
        {"role": "system", "content": EXPLAIN_SYSTEM},
        {"role": "user", "content": "The excerpts:\n" + numbered(examples)},
        {"role": "assistant", "content": EXPLANATION_START},
    ]


def scoring_question(explanation: str, examples: Sequence[str]) -> str:
    return f"The explanation: this feature activates on {explanation}.\n\nThe excerpts:\n" + numbered(examples)


def scoring_messages(
    kind: str, explanation: str, examples: Sequence[str], n_positive: int, rng: random.Random, demos: bool = True
) -> list[Message]:
    """The judge's prompt for `kind` "detection" (plain excerpts) or "fuzzing" (marked excerpts). The example
    answer in its instructions lists `n_positive` random numbers, as SAEBench's does, so that it hints at no
    particular excerpt."""
    n = len(examples)
    picks = sorted(rng.sample(range(1, n + 1), min(max(n_positive, 1), n)))
    system = DETECTION_SYSTEM if kind == "detection" else FUZZING_SYSTEM
    messages = [{"role": "system", "content": system.format(n=n, example=", ".join(map(str, picks)))}]
    if demos:
        demo_examples, demo_answer = DEMO_DETECTION if kind == "detection" else DEMO_FUZZING
        messages += [
            {"role": "user", "content": scoring_question(DEMO_EXPLANATION, demo_examples)},
            {"role": "assistant", "content": demo_answer},
        ]
    return messages + [{"role": "user", "content": scoring_question(explanation, examples)}]


def parse_explanation(answer: str) -> tuple[str, str | None]:
    """(explanation, problem): the first sentence after the first "activates on" (else of the answer), without its
    final period or surrounding quotes; the problem is None unless the answer holds no explanation."""
    text = " ".join(answer.split())
    if not text:
        return "", "empty answer"
    found = re.search(r"activates? on", text, flags=re.IGNORECASE)
    text = text[found.end() :] if found else text
    text = re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0].rstrip(".").strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'`":  # the whole explanation quoted
        text = text[1:-1].strip()
    if not text:
        return "", f"no explanation in the answer {answer!r}"
    return text[:300], None


def parse_numbers(answer: str, n: int) -> tuple[set[int] | None, str | None]:
    """(numbers, problem): the excerpt numbers (1 to `n`) an answer names, read from its first line with a digit
    or the word None; `None` (no numbers read) with the problem when the answer is empty, has no such line, or
    names a number outside 1 to `n`."""
    for line in answer.strip().splitlines():
        digits = re.findall(r"\d+", line)
        if digits:
            numbers = {int(d) for d in digits}
            outside = sorted(k for k in numbers if not 1 <= k <= n)
            if outside:
                return None, f"numbers outside 1-{n} in the answer {answer!r}"
            return numbers, None
        if re.search(r"\bnone\b", line, flags=re.IGNORECASE):
            return set(), None
    return None, f"no numbers and no None in the answer {answer!r}" if answer.strip() else "empty answer"


def random_marks(pieces: Sequence[str], n: int, rng: random.Random) -> list[bool]:
    """`n` random visible tokens marked (Delphi's negatives for fuzzing)."""
    visible = [j for j, p in enumerate(pieces) if p.strip()]
    chosen = set(rng.sample(visible, min(n, len(visible))))
    return [j in chosen for j in range(len(pieces))]


def answer_tokens(n: int) -> int:
    """The longest answer the judge may give about `n` excerpts (room for most of their numbers)."""
    return 3 * n + 5


def judge(
    kind: str,
    explanation: str,
    texts: Sequence[str],
    kinds: Sequence[str],
    llm: LLM,
    rng: random.Random,
    demos: bool = True,
) -> dict[str, Any]:
    """Ask the judge about `texts` (whose `kinds` are "top", "quantile" or "non-activating"). Its record: prompt,
    answer, the problem reading it (or None), and per example the prediction (None: unreadable) and whether it is
    right (an unreadable answer is wrong on every example)."""
    activating = [k != "non-activating" for k in kinds]
    messages = scoring_messages(kind, explanation, texts, sum(activating), rng, demos)
    answer = llm(messages, answer_tokens(len(texts)))
    numbers, problem = parse_numbers(answer, len(texts))
    predicted = [None if numbers is None else (j + 1) in numbers for j in range(len(texts))]
    return {"prompt": messages, "answer": answer, "problem": problem, "examples": rows(texts, kinds, predicted)}


def rows(texts: Sequence[str], kinds: Sequence[str], predicted: Sequence[bool | None]) -> list[dict[str, Any]]:
    """One record per judged example."""
    return [
        {
            "text": t,
            "kind": k,
            "activating": k != "non-activating",
            "predicted": p,
            "correct": p == (k != "non-activating"),
        }
        for t, k, p in zip(texts, kinds, predicted, strict=True)
    ]


def scores(judged: Sequence[dict[str, Any]]) -> dict[str, float]:
    """accuracy, balanced accuracy ((TPR + TNR) / 2, or the one rate defined) and F1 of judged examples (`rows`);
    an unreadable prediction counts as wrong."""
    tp = sum(r["activating"] and r["correct"] for r in judged)
    tn = sum(not r["activating"] and r["correct"] for r in judged)
    fn = sum(r["activating"] and not r["correct"] for r in judged)
    fp = sum(not r["activating"] and not r["correct"] for r in judged)
    rates = ([tp / (tp + fn)] if tp + fn else []) + ([tn / (tn + fp)] if tn + fp else [])
    return {
        "accuracy": (tp + tn) / len(judged) if judged else math.nan,
        "balanced_accuracy": sum(rates) / len(rates) if rates else math.nan,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan,
    }
