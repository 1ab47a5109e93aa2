"""Prompt features for the response-length predictor.

A prompt becomes one row of up to four blocks, in this order:

1. **Length features** (always): the prompt length [tokens] in the model's tokenizer and, when
   text is used, characters, words, lines, sentences, digits, question marks, and the length of
   the part after the first blank line (Alpaca's ``input``) [characters].
2. **Lexical cues** (:data:`CUE_PATTERNS`, when ``lexical_cues``, read from
   :meth:`PromptFeaturizer.cue_text`): what kind of answer the prompt asks for (a question word,
   "explain", "write a story", a list or enumeration, code markers, brevity or detail words,
   rewriting, classification, arithmetic) and any requested size, "in 3 sentences", "five
   examples", "200 words", as numbers.
3. **Word n-grams** (when ``ngram_vocabulary_size > 0``): TF-IDF over a vocabulary fitted on the
   training prompts (the ``ngram_vocabulary_size`` most frequent n-grams found in at least
   ``ngram_min_df`` prompts; sublinear term frequency, L2-normalised rows), either as sparse
   columns (``svd_components == 0``) or reduced to ``svd_components`` dense columns by a
   truncated SVD.
4. **Neighbour lengths** (when ``neighbour_count > 0``; off by default): statistics of the log
   response lengths of the ``neighbour_count`` training prompts most similar to the prompt (cosine
   similarity of the TF-IDF rows), :mod:`econoserve.predictor.neighbours`. Fitting needs the
   training lengths; the training prompts' own rows come from :meth:`PromptFeaturizer.training_matrix`
   (leave-one-out, or out-of-fold with ``neighbour_folds``), never from :meth:`~PromptFeaturizer.transform`,
   which would let each see itself.

The fitted state (vocabulary, IDF weights, SVD components, neighbour index) is plain JSON and ``.npz`` arrays, so a
saved model needs no pickle. :class:`PromptFeaturizer` is deterministic: the same prompts and
settings give the same matrix, bit for bit.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import CountVectorizer

from econoserve.errors import PredictorError
from econoserve.predictor.neighbours import NEIGHBOUR_FEATURES, NeighbourIndex
from econoserve.workload.tokenizer import Tokenizer, load_tokenizer

#: Numbers spelled out in prompts ("give three examples"), as values.
NUMBER_WORDS: dict[str, int] = {
    "a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "couple": 2, "three": 3, "four": 4,
    "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11,
    "twelve": 12, "fifteen": 15, "twenty": 20, "few": 3, "several": 4, "dozen": 12,
}  # fmt: skip

#: Binary / count cues: name -> case-insensitive regular expression (counted occurrences).
CUE_PATTERNS: dict[str, str] = {
    "starts_wh_question": r"^\s*(what|who|whom|whose|when|where|why|which|how)\b",
    "starts_yes_no_question": r"^\s*(is|are|was|were|do|does|did|can|could|should|would|will|has|have|had)\b",
    "explain": r"\b(explain|describe|discuss|elaborate|analy[sz]e|compare|contrast|evaluate|outline)\b",
    "creative_long": (
        r"\b(write|compose|create|draft|generate)\b[^.?!\n]{0,40}\b(story|stories|poem|essay|letter|"
        r"article|blog|speech|song|lyrics|script|dialogue|narrative|review|report|email|paragraph|"
        r"description|biography|plan|proposal)\b"
    ),
    "story": r"\b(story|stories|tale|narrative|poem|haiku|limerick|song)\b",
    "list_request": r"\b(list|enumerate|name|brainstorm|suggest|identify)\b|\blist of\b",
    "how_to": r"\bhow (to|do|can|should)\b|\bsteps?\b|\bstep[- ]by[- ]step\b|\bprocess\b",
    "brevity": (
        r"\b(brief|briefly|short|shortly|concise|concisely|one[- ]word|single word|one sentence|"
        r"one[- ]line|summari[sz]e|summary|tl;?dr|in a few words|headline|title|slogan|tweet)\b"
    ),
    "detail": r"\b(detailed|in detail|comprehensive|thorough|in[- ]depth|elaborate|extensive)\b",
    "code": (
        r"```|\bdef |\bfunction\b|\bclass\b|#include|\bcode\b|\bpython\b|\bjava(script)?\b|\bsql\b|"
        r"\bhtml\b|\bcss\b|\bprogram\b|\bscript\b|\balgorithm\b|\bregex\b|[{};]\s*$"
    ),
    "classify": (
        r"\b(classify|categori[sz]e|identify|determine|which of|true or false|yes or no|select|"
        r"choose|label|detect|is it|whether)\b"
    ),
    "rewrite": r"\b(rewrite|rephrase|paraphrase|edit|correct|fix|convert|translate|reword|simplify)\b",
    "arithmetic": r"\d+\s*[-+*/x^]\s*\d+|\b(calculate|compute|solve|sum|product|equation|percent)\b",
    "generate": r"\b(generate|create|come up with|produce|make up|invent|design)\b",
    "opinion": r"\b(opinion|think|argue|argument|pros and cons|advantages|disadvantages)\b",
    "example": r"\b(example|examples|instance|instances)\b",
}

_NUMBER = r"(\d+|" + "|".join(sorted(NUMBER_WORDS, key=len, reverse=True)) + r")"
#: Requested sizes: name -> pattern whose group 1 is the number ("in 3 sentences" -> 3).
REQUESTED_SIZE_PATTERNS: dict[str, str] = {
    "requested_words": rf"\b{_NUMBER}[- ]words?\b",
    "requested_sentences": rf"\b{_NUMBER}[- ]sentences?\b",
    "requested_paragraphs": rf"\b{_NUMBER}[- ]paragraphs?\b",
    "requested_lines": rf"\b{_NUMBER}[- ](lines?|verses?|stanzas?)\b",
    "requested_items": (
        rf"\b{_NUMBER}\s+(?:\w+\s+){{0,2}}(examples?|items?|ways?|tips?|reasons?|things?|ideas?|"
        r"steps?|questions?|facts?|words?|names?|points?|benefits?|strategies|methods?|types?|"
        r"sentences?|adjectives?|synonyms?|features?|characteristics?|uses?|differences?|activities|"
        r"countries|cities|animals|foods?|books?|movies?|songs?|options?|factors?|elements?)\b"
    ),
}

LENGTH_FEATURES_TEXT: tuple[str, ...] = (
    "prompt_chars",
    "prompt_words",
    "prompt_lines",
    "prompt_sentences",
    "prompt_digits",
    "prompt_question_marks",
    "input_chars",
)


@dataclass(frozen=True)
class FeatureConfig:
    """What the featurizer computes (see the module docstring).

    ``use_text``: text features at all; ``False`` gives a length-only model (prompt tokens) that
    works on traces without text (Azure, Mooncake). ``tokenizer``: the tokenizer whose count is
    the ``prompt_tokens`` feature and whose units the labels are in.

    ``neighbour_count``: the neighbour-length block over this many nearest training prompts (0 =
    off; needs n-grams). ``neighbour_folds``: how the training prompts' own neighbour statistics
    are computed, 0 = leave-one-out, K >= 2 = out-of-fold over K seeded folds.
    """

    tokenizer: str = "llama2"
    use_text: bool = True
    lexical_cues: bool = True
    ngram_vocabulary_size: int = 8000
    ngram_max_n: int = 2
    ngram_min_df: int = 3
    svd_components: int = 0
    cue_window_chars: int = 600
    neighbour_count: int = 0
    neighbour_folds: int = 0

    def __post_init__(self) -> None:
        if self.ngram_vocabulary_size < 0 or self.svd_components < 0:
            raise PredictorError("ngram_vocabulary_size and svd_components must be >= 0")
        if self.cue_window_chars < 1:
            raise PredictorError("cue_window_chars must be >= 1")
        if self.ngram_max_n < 1 or self.ngram_min_df < 1:
            raise PredictorError("ngram_max_n and ngram_min_df must be >= 1")
        if self.svd_components and not self.ngram_vocabulary_size:
            raise PredictorError("svd_components needs ngram_vocabulary_size > 0 (it reduces the n-grams)")
        if self.neighbour_count < 0 or self.neighbour_folds < 0 or self.neighbour_folds == 1:
            raise PredictorError("neighbour_count must be >= 0 and neighbour_folds 0 (leave-one-out) or >= 2")
        if self.neighbour_count and not self.uses_ngrams:
            raise PredictorError("neighbour_count needs text and ngram_vocabulary_size > 0 (it compares TF-IDF rows)")

    @property
    def uses_ngrams(self) -> bool:
        return self.use_text and self.ngram_vocabulary_size > 0


class PromptFeaturizer:
    """Turns prompts (text and token counts) into a feature matrix; fit on training prompts."""

    def __init__(self, config: FeatureConfig, tokenizer: Tokenizer | None = None) -> None:
        self.config = config
        self._tokenizer = tokenizer
        self._cues = {name: re.compile(p, re.IGNORECASE | re.MULTILINE) for name, p in CUE_PATTERNS.items()}
        self._sizes = {name: re.compile(p, re.IGNORECASE) for name, p in REQUESTED_SIZE_PATTERNS.items()}
        self.vocabulary: list[str] = []
        self.idf: np.ndarray = np.zeros(0, dtype=np.float64)
        self.svd_components: np.ndarray = np.zeros((0, 0), dtype=np.float64)
        self._counter: CountVectorizer | None = None
        self.neighbours: NeighbourIndex | None = None
        self._seed = 0

    # ----------------------------------------------------------------- tokenizer
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config.tokenizer)
        return self._tokenizer

    def count_tokens(self, prompts: Sequence[str]) -> np.ndarray:
        """Prompt lengths [tokens] in the configured tokenizer."""
        return self.tokenizer.count(list(prompts))

    # ----------------------------------------------------------------- fitting
    def fit(self, prompts: Sequence[str] | None, seed: int = 0, lengths: np.ndarray | None = None) -> "PromptFeaturizer":
        """Fit the n-gram vocabulary, IDF weights, SVD and neighbour index (when configured) on
        training prompts; ``lengths`` [tokens]: their response lengths (needed by the neighbour block)."""
        self._seed = seed
        if not self.config.uses_ngrams:
            return self
        if prompts is None:
            raise PredictorError("text features are configured but the training data has no prompt text")
        counter = _count_vectorizer(self.config.ngram_max_n, vocabulary=None)
        counter.set_params(min_df=min(self.config.ngram_min_df, max(len(prompts), 1)),
                           max_features=self.config.ngram_vocabulary_size)
        counts = counter.fit_transform(prompts)
        # Sorted vocabulary: column order does not depend on hash-map iteration order.
        self.vocabulary = sorted(counter.vocabulary_)
        self._counter = _count_vectorizer(self.config.ngram_max_n, vocabulary=self.vocabulary)
        counts = self._counter.transform(prompts)
        document_frequency = np.bincount(counts.indices, minlength=len(self.vocabulary))
        self.idf = np.log((1.0 + len(prompts)) / (1.0 + document_frequency)) + 1.0
        if self.config.svd_components:
            self.svd_components = _truncated_svd(self._tfidf(counts), self.config.svd_components, seed)
        if self.config.neighbour_count:
            if lengths is None or len(lengths) != len(prompts):
                raise PredictorError("the neighbour block needs one response length per training prompt")
            self.neighbours = NeighbourIndex.fit(self._tfidf(counts), lengths, self.config.neighbour_count)
        return self

    # ----------------------------------------------------------------- transforming
    def feature_names(self) -> list[str]:
        names = ["prompt_tokens"]
        if not self.config.use_text:
            return names
        names += list(LENGTH_FEATURES_TEXT)
        if self.config.lexical_cues:
            names += [f"cue_{name}" for name in CUE_PATTERNS] + list(REQUESTED_SIZE_PATTERNS)
        if self.config.uses_ngrams:
            if self.config.svd_components:
                names += [f"svd_{i}" for i in range(self.svd_components.shape[0])]
            else:
                names += [f"ngram[{term}]" for term in self.vocabulary]
        if self.config.neighbour_count:
            names += [f"neighbour_{name}" for name in NEIGHBOUR_FEATURES]
        return names

    def transform(
        self, prompts: Sequence[str] | None, prompt_tokens: np.ndarray | None = None
    ) -> sp.csr_matrix | np.ndarray:
        """The feature matrix (rows = prompts, columns = :meth:`feature_names`).

        ``prompt_tokens`` [tokens] is used when given (text-less traces); otherwise it is counted
        from ``prompts`` with the configured tokenizer. Returns a CSR matrix when sparse n-grams
        are used, else a dense float64 array. Neighbour statistics (when configured) are over all
        training prompts: for the training prompts themselves use :meth:`training_matrix`.
        """
        return self._transform(prompts, prompt_tokens, training=False)

    def training_matrix(self, prompts: Sequence[str] | None, prompt_tokens: np.ndarray | None = None
                        ) -> sp.csr_matrix | np.ndarray:
        """:meth:`transform` of the prompts this featurizer was fitted on (same order), with their
        neighbour statistics leave-one-out / out-of-fold (``neighbour_folds``); without the
        neighbour block the same as :meth:`transform`."""
        return self._transform(prompts, prompt_tokens, training=True)

    def _transform(self, prompts, prompt_tokens, training: bool):
        if self.config.use_text and prompts is None:
            raise PredictorError("this model uses prompt-text features, but no prompt text was given")
        if prompt_tokens is None:
            if prompts is None:
                raise PredictorError("need prompt text or prompt token counts to compute features")
            prompt_tokens = self.count_tokens(prompts)
        dense = [np.asarray(prompt_tokens, dtype=np.float64).reshape(-1, 1)]
        if self.config.use_text:
            dense.append(self._length_features(prompts))
            if self.config.lexical_cues:
                dense.append(self._cue_features(prompts))
        dense_block = np.hstack(dense)
        if not self.config.uses_ngrams:
            return dense_block
        if self._counter is None:
            raise PredictorError("the featurizer is not fitted (no n-gram vocabulary)")
        tfidf = self._tfidf(self._counter.transform(prompts))
        neighbours = [self._neighbour_block(tfidf, training)] if self.config.neighbour_count else []
        if self.config.svd_components:
            return np.hstack([dense_block, np.asarray(tfidf @ self.svd_components.T), *neighbours])
        return sp.hstack([sp.csr_matrix(dense_block), tfidf, *map(sp.csr_matrix, neighbours)],
                         format="csr", dtype=np.float64)

    def _neighbour_block(self, tfidf: sp.csr_matrix, training: bool) -> np.ndarray:
        if self.neighbours is None:
            raise PredictorError("the featurizer is not fitted (no neighbour index)")
        if not training:
            return self.neighbours.statistics(tfidf)
        if tfidf.shape[0] != len(self.neighbours):
            raise PredictorError(f"training_matrix needs the {len(self.neighbours)} fitted prompts, "
                                 f"got {tfidf.shape[0]}")
        return self.neighbours.training_statistics(self.config.neighbour_folds, self._seed)

    def _tfidf(self, counts: sp.csr_matrix) -> sp.csr_matrix:
        tfidf = counts.astype(np.float64)
        tfidf.data = np.log1p(tfidf.data)
        tfidf = tfidf @ sp.diags(self.idf)
        norms = np.sqrt(np.asarray(tfidf.multiply(tfidf).sum(axis=1)).ravel())
        norms[norms == 0] = 1.0
        return sp.csr_matrix(sp.diags(1.0 / norms) @ tfidf)

    @staticmethod
    def _length_features(prompts: Sequence[str]) -> np.ndarray:
        rows = np.empty((len(prompts), len(LENGTH_FEATURES_TEXT)), dtype=np.float64)
        for i, text in enumerate(prompts):
            _, _, input_part = text.partition("\n\n")
            rows[i] = (
                len(text),
                len(text.split()),
                text.count("\n") + 1,
                len(_SENTENCE_END.findall(text)) or 1,
                sum(ch.isdigit() for ch in text),
                text.count("?"),
                len(input_part),
            )
        return rows

    def cue_text(self, prompt: str) -> str:
        """The part of a prompt the lexical cues read: the instruction (the text before the first
        blank line, Alpaca's layout), cut to ``cue_window_chars``; for a prompt longer than twice
        that, also its last ``cue_window_chars`` characters (where a long document's question sits,
        e.g. QMSum's "Query: ..."). Bounds the regex cost of long prompts."""
        window = self.config.cue_window_chars
        instruction = prompt.partition("\n\n")[0][:window]
        if len(prompt) > 2 * window:
            return instruction + "\n" + prompt[-window:]
        return instruction

    def _cue_features(self, prompts: Sequence[str]) -> np.ndarray:
        rows = np.zeros((len(prompts), len(self._cues) + len(self._sizes)), dtype=np.float64)
        for i, text in enumerate(prompts):
            instruction = self.cue_text(text)
            for j, pattern in enumerate(self._cues.values()):
                rows[i, j] = len(pattern.findall(instruction))
            for j, pattern in enumerate(self._sizes.values(), start=len(self._cues)):
                match = pattern.search(instruction)
                rows[i, j] = _number_value(match.group(1)) if match else 0.0
        return rows

    # ----------------------------------------------------------------- persistence
    def save(self, directory: Path) -> list[str]:
        """Write the fitted state into ``directory``; return the file names written."""
        if not self.config.uses_ngrams:
            return []
        (directory / "vocabulary.json").write_text(json.dumps(self.vocabulary, ensure_ascii=True))
        np.savez(directory / "features.npz", idf=self.idf, svd_components=self.svd_components)
        if self.neighbours is None:
            return ["vocabulary.json", "features.npz"]
        return ["vocabulary.json", "features.npz", self.neighbours.save(directory)]

    @classmethod
    def load(cls, directory: Path, config: FeatureConfig, tokenizer: Tokenizer | None = None) -> "PromptFeaturizer":
        """The featurizer saved by :meth:`save` (raises :class:`PredictorError` if unreadable)."""
        featurizer = cls(config, tokenizer)
        if not config.uses_ngrams:
            return featurizer
        try:
            vocabulary = json.loads((directory / "vocabulary.json").read_text())
            with np.load(directory / "features.npz", allow_pickle=False) as arrays:
                idf, components = arrays["idf"], arrays["svd_components"]
        except (OSError, ValueError, KeyError) as exc:
            raise PredictorError(f"{directory}: cannot read the saved featurizer ({type(exc).__name__}: {exc})") from None
        if not isinstance(vocabulary, list) or len(vocabulary) != len(idf):
            raise PredictorError(f"{directory}: vocabulary.json and features.npz disagree (corrupt model?)")
        if config.svd_components and components.shape != (config.svd_components, len(vocabulary)):
            raise PredictorError(f"{directory}: SVD components have shape {components.shape}; corrupt model?")
        featurizer.vocabulary = [str(term) for term in vocabulary]
        featurizer.idf = idf
        featurizer.svd_components = components
        featurizer._counter = _count_vectorizer(config.ngram_max_n, vocabulary=featurizer.vocabulary)
        if config.neighbour_count:
            featurizer.neighbours = NeighbourIndex.load(directory, config.neighbour_count, len(vocabulary))
        return featurizer

    def describe(self) -> dict[str, object]:
        """The settings and sizes of this featurizer, for metadata."""
        return {"config": asdict(self.config), "num_features": len(self.feature_names()),
                "vocabulary_size": len(self.vocabulary)}


_SENTENCE_END = re.compile(r"[.!?](\s|$)")


def _number_value(token: str) -> float:
    token = token.lower()
    return float(token) if token.isdigit() else float(NUMBER_WORDS.get(token, 0))


def _count_vectorizer(max_n: int, vocabulary: list[str] | None) -> CountVectorizer:
    return CountVectorizer(
        lowercase=True,
        ngram_range=(1, max_n),
        token_pattern=r"(?u)\b\w+\b|[?!:;{}()#`]",
        vocabulary=vocabulary,
        dtype=np.float64,
    )


def _truncated_svd(matrix: sp.csr_matrix, components: int, seed: int) -> np.ndarray:
    """Top right singular vectors of ``matrix`` (rows of the result), signs fixed for determinism."""
    from sklearn.decomposition import TruncatedSVD

    components = min(components, min(matrix.shape) - 1)
    if components < 1:
        raise PredictorError("too few training prompts or n-grams for an SVD")
    svd = TruncatedSVD(n_components=components, algorithm="randomized", random_state=seed)
    svd.fit(matrix)
    vectors = svd.components_.copy()
    signs = np.sign(vectors[np.arange(len(vectors)), np.abs(vectors).argmax(axis=1)])
    return vectors * signs[:, None]
