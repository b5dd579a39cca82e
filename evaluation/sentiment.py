"""The ground-truth reward of controlled sentiment generation (DPO, Rafailov et al. 2023, Sec. 6.1).

A continuation's reward is its VADER compound sentiment score (Hutto and Gilbert 2014) in [-1, 1],
from the lexicon the `vaderSentiment` package ships: a reward no one here wrote or tuned. Reward
models and policies never read it; runs use it to label preference pairs, to score samples and,
when asked, as PPO's reward.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer


@functools.lru_cache(maxsize=1)
def _analyzer():
    return SentimentIntensityAnalyzer()


def sentiment(texts: Sequence[str]) -> list[float]:
    """VADER compound score of each text: -1 most negative, 0 neutral (or no lexicon word), +1 most positive."""
    analyzer = _analyzer()
    return [analyzer.polarity_scores(text)["compound"] for text in texts]
