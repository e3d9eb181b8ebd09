"""METEOR: one tokenizer, NLTK's `meteor_score` with an offline WordNet, and the `caption_meteor` reward.

Every METEOR in sa2va-trl (this reward, the cycle reward, evaluation scripts) tokenises with
`tokenize` and scores with `meteor`, so numbers are comparable across the project. Scores equal
`nltk.translate.meteor_score.meteor_score` on the same token lists: the only changes are
memoised WordNet look-ups and Porter stems, which return the same values faster.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from .columns import (
    TASK_MASK_TO_CAPTION,
    batch_length,
    completion_text,
    get_column,
    reference_texts,
    task_mask,
)
from .errors import RewardInputError
from .registry import register_reward

__all__ = ["tokenize", "meteor", "meteor_tokens", "CaptionMeteor"]

# Words are runs of letters/digits, with inner apostrophes kept ("don't"); punctuation and
# underscores split. Lower-cased first, so no NLTK punkt download is ever needed.
_WORD_RE = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")


def tokenize(text: str) -> list[str]:
    """Lower-case `text` and split it into words (the tokenisation every METEOR here uses).

    Args:
        text: any string.

    Returns:
        The list of lower-cased word tokens.

    Example:
        >>> tokenize("A red Square, top-left; it's big!")
        ['a', 'red', 'square', 'top', 'left', "it's", 'big']
    """
    return _WORD_RE.findall(text.lower())


class _MemoWordNet:
    """Forwards to a WordNet reader, memoising `synsets(word)`: METEOR calls it per word per pair."""

    def __init__(self, reader: Any):
        self._reader = reader
        self.synsets = lru_cache(maxsize=200_000)(self._synsets)

    def _synsets(self, word: str, pos: Any = None) -> tuple:
        return tuple(self._reader.synsets(word, pos))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)


_memo: dict[int, _MemoWordNet] = {}
_stemmer = None


def _memo_wordnet(reader: Any) -> _MemoWordNet:
    memo = _memo.get(id(reader))
    if memo is None or memo._reader is not reader:
        memo = _memo[id(reader)] = _MemoWordNet(reader)
    return memo


def _memo_stemmer():
    global _stemmer
    if _stemmer is None:
        from nltk.stem.api import StemmerI
        from nltk.stem.porter import PorterStemmer

        class MemoPorterStemmer(StemmerI):
            def __init__(self):
                self._stem = lru_cache(maxsize=200_000)(PorterStemmer().stem)

            def stem(self, token: str) -> str:
                return self._stem(token)

        _stemmer = MemoPorterStemmer()
    return _stemmer


def meteor_tokens(
    hypothesis: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    alpha: float = 0.9,
    beta: float = 3.0,
    gamma: float = 0.5,
    wordnet: Any = None,
) -> float:
    """METEOR of a tokenised hypothesis against tokenised references (the best reference counts).

    Args:
        hypothesis: the hypothesis tokens.
        references: one token list per reference.
        alpha, beta, gamma: METEOR's parameters (NLTK's defaults).
        wordnet: a WordNet reader; default `load_wordnet()`.

    Returns:
        NLTK's `meteor_score(references, hypothesis)`: 0.0 when nothing matches or the hypothesis is empty.

    Example:
        >>> round(meteor_tokens(["the", "puppy", "is", "running", "on", "the", "grass"],
        ...                     [["a", "dog", "runs", "on", "grass"]]), 6)
        0.491453
    """
    from nltk.translate.meteor_score import meteor_score

    if wordnet is None:
        from .wordnet import load_wordnet

        wordnet = load_wordnet()
    return float(
        meteor_score(
            [list(r) for r in references],
            list(hypothesis),
            stemmer=_memo_stemmer(),
            wordnet=_memo_wordnet(wordnet),
            alpha=alpha,
            beta=beta,
            gamma=gamma,
        )
    )


def meteor(hypothesis: str, references: str | Sequence[str], **kwargs: Any) -> float:
    """METEOR of a caption against one or more reference captions, tokenised with `tokenize`.

    Args:
        hypothesis: the generated caption.
        references: a reference caption or a list of them.
        **kwargs: `alpha`, `beta`, `gamma`, `wordnet` (see `meteor_tokens`).

    Returns:
        The METEOR score in [0, 1).

    Example:
        >>> round(meteor("The puppy is running on the grass.", "A dog runs on grass"), 6)
        0.491453
    """
    refs = [references] if isinstance(references, str) else list(references)
    return meteor_tokens(tokenize(hypothesis), [tokenize(r) for r in refs], **kwargs)


class MeteorScorer:
    """Scores many (hypothesis, references) pairs, computing each distinct pair once (G samples are often equal)."""

    def __init__(self, alpha: float = 0.9, beta: float = 3.0, gamma: float = 0.5, wordnet_dir: str | None = None):
        self.alpha, self.beta, self.gamma, self.wordnet_dir = alpha, beta, gamma, wordnet_dir

    def score_batch(self, pairs: Sequence[tuple[str, Sequence[str]]], *, reward: str, field: str, rows: Sequence[int]) -> list[float]:
        from .wordnet import load_wordnet

        wordnet = load_wordnet(self.wordnet_dir)
        seen: dict[tuple, float] = {}
        out = []
        for row, (hyp, refs) in zip(rows, pairs):
            hyp_tokens = tuple(tokenize(hyp))
            ref_tokens = tuple(tuple(tokenize(r)) for r in refs)
            if not any(ref_tokens):
                raise RewardInputError(f"reference caption {refs!r} has no words", reward=reward, row=row, field=field)
            key = (hyp_tokens, ref_tokens)
            if key not in seen:
                seen[key] = meteor_tokens(
                    hyp_tokens, [r for r in ref_tokens if r], alpha=self.alpha, beta=self.beta, gamma=self.gamma, wordnet=wordnet
                )
            out.append(seen[key])
        return out


@register_reward("caption_meteor")
class CaptionMeteor:
    """METEOR of each generated caption (`completions[i]`) against the row's reference caption(s).

    Applies to rows whose reference column (default `caption`) is not None and, when a `task`
    column is present, whose task is in `tasks` (default: loop 1, "mask_to_caption"); None
    elsewhere. Completions may be strings or chat message lists (the assistant content is used).
    A reference may be a str or a list of str (the best match counts, as in METEOR).

    Args:
        reference_column: the column with the reference caption(s).
        tasks: task names the reward applies to when a `task` column exists (None: all).
        alpha, beta, gamma: METEOR's parameters (NLTK's defaults).
        wordnet_dir: NLTK data directory for WordNet (see `load_wordnet`).

    Returns:
        Calling it returns one float in [0, 1) (or None) per completion.

    Example:
        >>> reward = CaptionMeteor()
        >>> scores = reward(prompts=["p", "p", "p"], completion_ids=[[], [], []],
        ...                 completions=["The puppy is running on the grass.", "a dog runs on grass", "x"],
        ...                 caption=["A dog runs on grass", ["a dog runs on grass", "a cat"], None])
        >>> [None if s is None else round(s, 4) for s in scores]
        [0.4915, 0.996, None]
    """

    __name__ = "caption_meteor"

    def __init__(
        self,
        reference_column: str = "caption",
        tasks: Sequence[str] | None = (TASK_MASK_TO_CAPTION,),
        alpha: float = 0.9,
        beta: float = 3.0,
        gamma: float = 0.5,
        wordnet_dir: str | None = None,
    ):
        self.reference_column = reference_column
        self.tasks = tuple(tasks) if tasks is not None else None
        self.scorer = MeteorScorer(alpha=alpha, beta=beta, gamma=gamma, wordnet_dir=wordnet_dir)

    def __call__(self, prompts=None, completions=None, completion_ids=None, **columns) -> list[float | None]:
        name = self.__name__
        n = batch_length(completions, reward=name)
        refs_column = get_column(columns, self.reference_column, n, reward=name)
        applies = task_mask(columns, n, self.tasks, reward=name)
        rows, pairs = [], []
        for i in range(n):
            refs = reference_texts(refs_column[i], row=i, field=self.reference_column, reward=name)
            if refs is None or not applies[i]:
                continue
            rows.append(i)
            pairs.append((completion_text(completions[i], row=i, reward=name), refs))
        out: list[float | None] = [None] * n
        for i, score in zip(rows, self.scorer.score_batch(pairs, reward=name, field=self.reference_column, rows=rows)):
            out[i] = score
        return out

    def __repr__(self) -> str:
        return f"CaptionMeteor(reference_column={self.reference_column!r}, tasks={self.tasks!r})"
