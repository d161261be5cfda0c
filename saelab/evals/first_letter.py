"""The first-letter task of the absorption eval (Chanin et al. 2024; SAEBench's `absorption_first_letter`): words
from the model's own vocabulary, in-context prompts asking for their first letter, and the model's activations
at each word's last token. None of it depends on an SAE, so the activations are cached per model and settings.

A prompt is ten solved examples and the question, each on its own line, a newline first as in SAEBench:

    "\n cat has the first letter: C\n ..." + "\n" + " dog has the first letter:"

The activation is read at the question word's last token, found per prompt by tokenising the prompt up to the
word's end (SAEBench reads position -6, which holds only where the template's suffix is five tokens).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from saelab.core.errors import ConfigError, FileFormatError
from saelab.core.files import read_json, read_safetensors, replacing_directory
from saelab.evals.text_activations import pooled_activations, tokenize_texts

LETTERS = "abcdefghijklmnopqrstuvwxyz"
CACHE_VERSION = 1  # bump when what is cached, or how it is computed, changes


def first_letter_vocab(tokenizer) -> list[str]:
    """Every vocabulary entry that decodes, alone, to ASCII letters after at most one leading space (SAEBench's
    rule: fragments such as "ression" count), as decoded, leading space kept; in token-id order, no repeats."""
    special = set(tokenizer.all_special_tokens)
    words: dict[str, None] = {}
    for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        if token in special:
            continue
        text = tokenizer.convert_tokens_to_string([token])
        if token.startswith("\u2581") and not text.startswith(" "):  # sentencepiece drops a word-initial space
            text = " " + text
        letters = text[1:] if text.startswith(" ") else text
        if letters and letters.isascii() and letters.isalpha():
            words[text] = None
    return list(words)


def first_letter(word: str) -> str:
    """The lower-case first letter of a vocabulary word."""
    return word.strip()[0].lower()


def letter_labels(words: Sequence[str]) -> Tensor:
    """Class index (a = 0 ... z = 25) of each word's first letter."""
    return torch.tensor([LETTERS.index(first_letter(w)) for w in words], dtype=torch.long)


def check_template(template: str) -> None:
    """A ConfigError unless `template` holds `{word}` once and no other field."""
    try:
        ok = template.count("{word}") == 1 and template.format(word="") == template.replace("{word}", "")
    except (KeyError, IndexError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"prompt_template must contain '{{word}}' once and no other braces, got {template!r}")


def icl_prompt(word: str, examples: Sequence[str], template: str) -> tuple[str, int]:
    """The prompt asking for `word`'s first letter after the solved `examples`, and the index of the character
    just past the word in it."""
    solved = "".join(f"\n{template.format(word=e)} {first_letter(e).upper()}" for e in examples)
    head = solved + "\n"
    return head + template.format(word=word), len(head) + template.index("{word}") + len(word)


def sample_examples(rng: random.Random, pool: Sequence[str], word: str, n: int) -> list[str]:
    """`n` distinct words of `pool` other than `word`."""
    drawn = rng.sample(pool, min(len(pool), n + 1))
    return [w for w in drawn if w != word][:n]


def word_positions(tokenizer, prompts: Sequence[tuple[str, int]], prepend_bos: bool) -> list[list[int] | None]:
    """Token ids of each prompt and, appended last, the index of the token where its word ends; None where the
    word's tokens merge with the text after it (its tokens are not a prefix of the prompt's)."""
    texts = [p for p, _ in prompts]
    full = tokenize_texts(tokenizer, texts, max_length=1 << 30, prepend_bos=prepend_bos)
    heads = tokenize_texts(tokenizer, [p[:end] for p, end in prompts], max_length=1 << 30, prepend_bos=prepend_bos)
    return [ids + [len(head) - 1] if ids[: len(head)] == head else None for ids, head in zip(full, heads, strict=True)]


@dataclass
class FirstLetterData:
    """Words split into train and test, and the model's activations at each word in its prompt. `absorb_acts`
    are the test words again, each in a second prompt with fresh examples from the whole vocabulary (SAEBench
    measures absorption on those)."""

    train_words: list[str]
    test_words: list[str]
    train_acts: Tensor
    test_acts: Tensor
    absorb_acts: Tensor
    n_vocab_words: int
    """Words of the vocabulary that qualify, before subsampling."""
    n_dropped: int
    """Words left out because their tokens merge with the text after them in the prompt."""
    folder: Path | None = None
    """The cache folder holding them (None: not cached)."""


def model_fingerprint(model, hook: str) -> str:
    """A hash of the model's tokenizer and its activations at `hook` on a fixed text: a different model or
    hook point gives a different fingerprint, without hashing the weights."""
    tokenizer = model.tokenizer
    ids = tokenizer("The first letter of every word", add_special_tokens=False)["input_ids"]
    device = next(model.model.parameters()).device
    acts = model.run_with_cache(torch.tensor([ids], device=device), [hook])[hook].float().cpu()
    digest = hashlib.sha256(json.dumps([len(tokenizer), type(tokenizer).__name__, ids, hook]).encode())
    digest.update(acts.mul(1e3).round().to(torch.int64).numpy().tobytes())  # robust to last-bit noise
    return digest.hexdigest()


def first_letter_data(
    model,
    hook: str,
    n_words: int | None,
    test_fraction: float,
    template: str,
    n_examples: int,
    prepend_bos: bool,
    seed: int,
    batch_size: int = 16,
    cache: Path | None = None,
    progress: bool = True,
) -> FirstLetterData:
    """Build (or read from the folder `cache`) the words and activations. `n_words`: how many of the qualifying
    vocabulary words to use (a seeded sample; None: all)."""
    check_template(template)
    settings = dict(
        fingerprint=model_fingerprint(model, hook), n_words=n_words, test_fraction=test_fraction,
        template=template, n_examples=n_examples, prepend_bos=prepend_bos, seed=seed, version=CACHE_VERSION,
    )  # fmt: skip
    folder = None
    if cache is not None:
        folder = cache / hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
        if (folder / "words.json").is_file():
            try:
                return _read(folder)
            except FileFormatError:
                pass  # unreadable: built again and replaced below
    data = _build(model, hook, n_words, test_fraction, template, n_examples, prepend_bos, seed, batch_size, progress)
    if folder is not None:
        _write(folder, data, settings)
        data.folder = folder
    return data


def _build(model, hook, n_words, test_fraction, template, n_examples, prepend_bos, seed, batch_size, progress):
    vocab = first_letter_vocab(model.tokenizer)
    rng = random.Random(seed)
    words = rng.sample(vocab, len(vocab) if n_words is None else min(n_words, len(vocab)))
    n_test = round(len(words) * test_fraction)
    if n_test < 1 or len(words) - n_test <= n_examples:
        raise ConfigError(
            f"{len(words)} words ({len(vocab)} in the vocabulary) cannot give a test split and "
            f"{n_examples} in-context examples: raise n_words"
        )
    train, test = words[n_test:], words[:n_test]
    # Examples come from the word's own split; the second prompts of the test words from the whole vocabulary.
    prompts = [icl_prompt(w, sample_examples(rng, train, w, n_examples), template) for w in train]
    prompts += [icl_prompt(w, sample_examples(rng, test, w, n_examples), template) for w in test]
    prompts += [icl_prompt(w, sample_examples(rng, vocab, w, n_examples), template) for w in test]
    tokens = word_positions(model.tokenizer, prompts, prepend_bos)
    n = len(train)
    keep_train = [i for i in range(n) if tokens[i] is not None]
    keep_test = [j for j in range(n_test) if tokens[n + j] is not None and tokens[n + n_test + j] is not None]
    order = keep_train + [n + j for j in keep_test] + [n + n_test + j for j in keep_test]
    rows = [tokens[i] for i in order]
    acts = _activations(model, hook, [r[:-1] for r in rows], [r[-1] for r in rows], batch_size, progress)
    n_train, n_kept = len(keep_train), len(keep_test)
    return FirstLetterData(
        train_words=[train[i] for i in keep_train],
        test_words=[test[j] for j in keep_test],
        train_acts=acts[:n_train],
        test_acts=acts[n_train : n_train + n_kept],
        absorb_acts=acts[n_train + n_kept :],
        n_vocab_words=len(vocab),
        n_dropped=len(words) - n_train - n_kept,
    )


def _activations(model, hook, token_lists, positions, batch_size, progress) -> Tensor:
    """Activations at the given positions, in chunks so that a progress bar can follow them."""
    chunk = max(batch_size, 256)
    parts = []
    with tqdm(total=len(token_lists), desc="absorption: prompts", unit="prompt", disable=not progress) as bar:
        for start in range(0, len(token_lists), chunk):
            end = start + chunk
            acts = pooled_activations(model, token_lists[start:end], hook, positions[start:end], batch_size=batch_size)
            parts.append(acts["acts"])
            bar.update(len(parts[-1]))
    return torch.cat(parts) if parts else torch.zeros(0)


def _write(folder: Path, data: FirstLetterData, settings: dict) -> None:
    with replacing_directory(folder) as staging:
        tensors = {"train_acts": data.train_acts, "test_acts": data.test_acts, "absorb_acts": data.absorb_acts}
        save_file({k: v.contiguous() for k, v in tensors.items()}, staging / "acts.safetensors")
        words = dict(
            settings=settings, train_words=data.train_words, test_words=data.test_words,
            n_vocab_words=data.n_vocab_words, n_dropped=data.n_dropped,
        )  # fmt: skip
        (staging / "words.json").write_text(json.dumps(words))


def _read(folder: Path) -> FirstLetterData:
    words = read_json(folder / "words.json")
    acts = read_safetensors(folder / "acts.safetensors")
    try:
        data = FirstLetterData(
            words["train_words"], words["test_words"], acts["train_acts"], acts["test_acts"], acts["absorb_acts"],
            words["n_vocab_words"], words["n_dropped"], folder,
        )  # fmt: skip
    except KeyError as e:
        raise FileFormatError(f"{folder}: missing {e}") from None
    if len(data.train_acts) != len(data.train_words) or len(data.test_acts) != len(data.test_words):
        raise FileFormatError(f"{folder}: words and activations disagree")
    return data
