"""Text-grounded codebook input: behaviour embeddings that lean on the item's text where behaviour is thin.

For item ``i`` with ``n_i`` training interactions, behaviour embedding ``b_i`` (stage 1) and text features
``t_i``, the codebook quantises::

    x_i = a_i * b_i + (1 - a_i) * s * (W t~_i + c),        a_i = n_i / (n_i + prior_interactions)

* ``t~_i`` is ``t_i`` centred by the fit items' mean and scaled to unit length: TF-IDF rows and mean LLM
  embeddings differ in scale by orders of magnitude, and their direction carries the meaning.
* ``W, c`` map text to the behaviour space: a ridge regression (scikit-learn ``Ridge``, closed form) fitted on
  the items with at least ``min_interactions`` training interactions, the ones whose behaviour embedding DCCF
  actually learned. An item with no interaction keeps its random initial embedding, which is noise to fit.
* ``s`` is one global factor that gives the estimates the fit items' mean behaviour norm. Text explains only part
  of behaviour, so a ridge map shrinks its estimates towards the centre of the space; unscaled, the text-coded
  items would crowd a few central codes and share tuples. One factor for all keeps their relative confidence.
* ``a_i`` is a shrinkage weight: the behaviour embedding counts as ``n_i`` observations, the text estimate as a
  prior worth ``prior_interactions``. Items with no training interaction (the long tail's zeros, brand-new items)
  are coded from their text alone; well-observed items keep their behaviour geometry. Items without text keep
  their behaviour embedding whatever their count.

Text features (``encoder``):

* ``tfidf``: TF-IDF (sublinear tf, English stop words, terms in at least two items) reduced by truncated SVD,
  both scikit-learn, fitted on the catalogue's text. The default: with a randomly initialised CPU LLM the mean
  input embedding is a random projection of the bag of words, and TF-IDF predicts behaviour better.
* ``llm``: the paper's text embedding, the mean LLM input embedding over title + description
  (:mod:`datamodules.llm_embeddings`); the one to use with a pretrained LLM.

The fitted grounding is a plain dict of tensors (:meth:`TextGrounding.state_dict`) that the stage-2 export stores
in ``codebook.pt``, so new items are coded from their text later without refitting anything.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch

from datamodules.errors import SemConvError

Encoder = Literal["tfidf", "llm"]


class TextGroundingError(SemConvError):
    """Text grounding that cannot be fitted or applied as asked."""


@dataclass
class TextGroundingSpec:
    """How the codebook input is grounded in text (``data.init_args.text_grounding``; null turns it off).

    Args:
        encoder: ``tfidf`` (TF-IDF + truncated SVD) or ``llm`` (mean LLM input embedding; needs ``llm_path``).
        prior_interactions: weight of the text estimate, in training interactions (``a = n / (n + prior)``).
        min_interactions: training interactions an item needs to take part in fitting the text-to-behaviour map.
        ridge: L2 penalty of the ridge regression.
        tfidf_dim: SVD dimensions of the TF-IDF features.
        seed: seed of the randomised SVD.
    """

    encoder: Encoder = "tfidf"
    prior_interactions: float = 2.0
    min_interactions: int = 5
    ridge: float = 10.0
    tfidf_dim: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        field = "data.init_args.text_grounding."
        if self.encoder not in ("tfidf", "llm"):
            raise TextGroundingError(f"{field}encoder must be 'tfidf' or 'llm', got {self.encoder!r}.")
        if self.prior_interactions <= 0:
            raise TextGroundingError(f"{field}prior_interactions must be > 0, got {self.prior_interactions}.")
        if self.min_interactions < 1 or self.tfidf_dim < 1 or self.ridge < 0:
            raise TextGroundingError(
                f"{field}: min_interactions and tfidf_dim must be >= 1 and ridge >= 0 (got {self.min_interactions}, "
                f"{self.tfidf_dim}, {self.ridge})."
            )


def _tfidf_vectorizer(vocabulary: dict[str, int] | None = None):
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(sublinear_tf=True, stop_words="english", min_df=2, vocabulary=vocabulary)


class TfidfEncoder:
    """TF-IDF + truncated SVD text features, stored as plain arrays (vocabulary, idf, SVD components)."""

    def __init__(self, vocabulary: list[str], idf: torch.Tensor, components: torch.Tensor) -> None:
        self.vocabulary, self.idf, self.components = vocabulary, idf.double(), components.double()
        self._vectorizer = _tfidf_vectorizer({term: i for i, term in enumerate(vocabulary)})
        self._vectorizer.idf_ = self.idf.numpy()

    @classmethod
    def fit(cls, texts: list[str], dim: int, seed: int) -> TfidfEncoder:
        from sklearn.decomposition import TruncatedSVD

        documents = [text for text in texts if text]
        vectorizer = _tfidf_vectorizer()
        try:
            matrix = vectorizer.fit_transform(documents)
        except ValueError as err:  # empty vocabulary
            raise TextGroundingError(
                f"TF-IDF text features cannot be fitted on {len(documents)} item texts ({err}); set "
                "`data.init_args.text_grounding: null` for a catalogue without usable text."
            ) from None
        dim = min(dim, matrix.shape[1] - 1, matrix.shape[0] - 1)
        if dim < 1:
            raise TextGroundingError(f"TF-IDF: {matrix.shape[1]} terms in the item texts, too few for SVD features.")
        svd = TruncatedSVD(dim, random_state=seed).fit(matrix)
        vocabulary = [""] * len(vectorizer.vocabulary_)
        for term, column in vectorizer.vocabulary_.items():
            vocabulary[column] = term
        return cls(vocabulary, torch.from_numpy(vectorizer.idf_), torch.from_numpy(svd.components_))

    def transform(self, texts: list[str]) -> torch.Tensor:
        return torch.from_numpy(self._vectorizer.transform(texts) @ self.components.numpy().T)

    def state_dict(self) -> dict[str, Any]:
        return {"vocabulary": list(self.vocabulary), "idf": self.idf, "components": self.components}


def _unit(features: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    centred = features.double() - mean
    return centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12)


class TextGrounding:
    """A fitted text-to-behaviour map and the rule that mixes it with behaviour (see the module docstring)."""

    def __init__(
        self,
        spec: TextGroundingSpec,
        text_mean: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        scale: float,
        encoder: TfidfEncoder | None = None,
        llm_fingerprint: str | None = None,
    ) -> None:
        self.spec, self.text_mean, self.weight, self.bias, self.scale = spec, text_mean, weight, bias, scale
        self.encoder, self.llm_fingerprint = encoder, llm_fingerprint

    @property
    def text_dim(self) -> int:
        return int(self.weight.shape[1])

    @classmethod
    def fit(
        cls,
        spec: TextGroundingSpec,
        features: torch.Tensor,
        behaviour: torch.Tensor,
        fit_rows: torch.Tensor,
        encoder: TfidfEncoder | None = None,
        llm_fingerprint: str | None = None,
    ) -> TextGrounding:
        """Fit the map on ``features[fit_rows] -> behaviour[fit_rows]`` (``fit_rows``: a boolean mask)."""
        from sklearn.linear_model import Ridge

        rows = torch.as_tensor(fit_rows, dtype=torch.bool)
        count = int(rows.sum())
        if count < 2:
            raise TextGroundingError(
                f"text grounding needs items with text and >= {spec.min_interactions} training interactions to fit "
                f"its map; {count} have both. Lower `data.init_args.text_grounding.min_interactions` or set "
                "`text_grounding: null`."
            )
        mean = features[rows].double().mean(0)
        x, y = _unit(features[rows], mean).numpy(), behaviour[rows].double().numpy()
        ridge = Ridge(alpha=spec.ridge).fit(x, y)
        weight, bias = torch.from_numpy(ridge.coef_).double(), torch.from_numpy(np.atleast_1d(ridge.intercept_))
        estimate = torch.from_numpy(ridge.predict(x))
        scale = float(torch.from_numpy(y).norm(dim=1).mean() / estimate.norm(dim=1).mean().clamp_min(1e-12))
        return cls(spec, mean, weight, bias.double(), scale, encoder, llm_fingerprint)

    def check_features(self, features: torch.Tensor) -> None:
        """Refuse text features of another shape than the grounding was fitted on (another encoder or LLM)."""
        if features.dim() != 2 or features.shape[1] != self.text_dim:
            raise TextGroundingError(
                f"text features of shape {list(features.shape)}, but the grounding was fitted on {self.text_dim}-dim "
                f"{self.spec.encoder} features: compute them with the same text encoder (and LLM) as the codebook."
            )

    def estimate(self, features: torch.Tensor) -> torch.Tensor:
        """``[m, dim]`` behaviour-space estimates of items from their text features ``[m, text_dim]``."""
        self.check_features(features)
        return self.scale * (_unit(features, self.text_mean) @ self.weight.T + self.bias)

    def inputs(
        self, behaviour: torch.Tensor, features: torch.Tensor, interactions: torch.Tensor, has_text: torch.Tensor
    ) -> torch.Tensor:
        """The codebook input ``x`` of items (float32): behaviour shrunk towards the text estimate."""
        alpha = interactions.double() / (interactions.double() + self.spec.prior_interactions)
        alpha = torch.where(has_text.bool(), alpha, torch.ones_like(alpha))[:, None]
        mixed = alpha * behaviour.double() + (1 - alpha) * self.estimate(features)
        return mixed.float()

    def features(self, texts: list[str]) -> torch.Tensor:
        """TF-IDF features of ``texts`` (the ``llm`` encoder's come from :mod:`datamodules.llm_embeddings`)."""
        if self.encoder is None:
            raise TextGroundingError(
                "this grounding uses LLM text embeddings: compute them with the codebook's LLM "
                "(datamodules.llm_embeddings) and pass them as features."
            )
        return self.encoder.transform(texts)

    def state_dict(self) -> dict[str, Any]:
        return {
            "spec": asdict(self.spec),
            "text_mean": self.text_mean,
            "weight": self.weight,
            "bias": self.bias,
            "scale": self.scale,
            "encoder": None if self.encoder is None else self.encoder.state_dict(),
            "llm_fingerprint": self.llm_fingerprint,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TextGrounding:
        encoder = None if state["encoder"] is None else TfidfEncoder(**state["encoder"])
        return cls(
            TextGroundingSpec(**state["spec"]),
            state["text_mean"],
            state["weight"],
            state["bias"],
            float(state["scale"]),
            encoder,
            state.get("llm_fingerprint"),
        )

    def fingerprint(self) -> str:
        """SHA-256 over the fitted arrays: what a manifest records and a consumer compares."""
        digest = hashlib.sha256()
        for tensor in (self.text_mean, self.weight, self.bias, torch.tensor([self.scale], dtype=torch.float64)):
            digest.update(tensor.double().contiguous().numpy().tobytes())
        digest.update(repr(asdict(self.spec)).encode())
        return digest.hexdigest()


def training_interactions(item_rows: np.ndarray, num_items: int) -> torch.Tensor:
    """``[num_items]`` training interaction count of every item (from the split's training interactions)."""
    return torch.from_numpy(np.bincount(item_rows, minlength=num_items)).long()
