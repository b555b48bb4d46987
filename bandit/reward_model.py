"""Cross-fitted reward model q̂(x, a) for the direct method and doubly robust estimators.

A ridge regression (scikit-learn) on hashed one-hot features of the carrier crossed with the
decision's context (class, country, operator, local time band, tenant, retry or not). Squared
loss over rows equals squared loss over distinct keys weighted by their counts, so the model is
fitted from per-key sums of rewards (O(keys), not O(rows); sums stream and merge). Cross-fitting:
decisions are split into K folds by a hash of their id; fold k's rows are predicted by the model
fitted on the other K − 1 folds, so no row's prediction has seen that row's reward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import sparse
from sklearn.feature_extraction import FeatureHasher
from sklearn.linear_model import Ridge

KEY_COLUMNS = ("carrier", "message_class", "country", "operator", "band", "tenant", "retry")

# Feature groups: context main effects, then the carrier crossed with ever finer contexts; ridge
# shrinks each finer cell towards the coarser ones (as a hierarchical model would).
INTERACTIONS: tuple[tuple[str, ...], ...] = (
    ("message_class",),
    ("country",),
    ("tenant",),
    ("retry",),
    ("carrier",),
    ("carrier", "message_class"),
    ("carrier", "retry"),
    ("carrier", "tenant"),
    ("carrier", "country"),
    ("carrier", "country", "message_class"),
    ("carrier", "country", "tenant"),
    ("carrier", "country", "band"),
    ("carrier", "country", "operator"),
    ("carrier", "country", "operator", "band"),
)

_FOLD_HASH_KEY = "ope-crossfit-key"  # 16 bytes: folds independent of the log's partitions


def fold_of(ids: np.ndarray, n_folds: int) -> np.ndarray:
    """A stable fold in [0, n_folds) per decision id (so every pass agrees on a row's fold)."""
    hashed = pd.util.hash_array(
        np.asarray(ids, dtype=object), hash_key=_FOLD_HASH_KEY, categorize=False
    )
    return (hashed % np.uint64(n_folds)).astype(np.int64)


def _features(keys: pd.DataFrame) -> sparse.csr_matrix:
    """Hashed one-hot features (2²⁰ columns) of each row of distinct keys."""
    hasher = FeatureHasher(n_features=2**20, input_type="string", alternate_sign=False)
    cols = {c: keys[c].astype(str).to_numpy() for c in KEY_COLUMNS}
    rows = (
        [f"{'*'.join(g)}={'|'.join(cols[c][i] for c in g)}" for g in INTERACTIONS]
        for i in range(len(keys))
    )
    return hasher.transform(rows)


def _compact(x: sparse.csr_matrix, columns: np.ndarray) -> sparse.csr_matrix:
    """x restricted to the (sorted) hashed `columns` the model was fitted on, renumbered."""
    pos = np.minimum(np.searchsorted(columns, x.indices), len(columns) - 1)
    known = columns[pos] == x.indices
    out = sparse.csr_matrix(
        (np.where(known, x.data, 0.0), pos, x.indptr), shape=(x.shape[0], len(columns))
    )
    out.eliminate_zeros()
    return out


@dataclass
class CrossFitRewardModel:
    """Per-fold reward sums per key; `fit` gives one ridge model per fold, `predict` cross-fits."""

    n_folds: int = 5
    alpha: float = 5.0
    sums: pd.DataFrame | None = None
    models: list[Ridge] = field(default_factory=list)
    columns: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    # Prediction cache: q̂ of every fold's model for each distinct key seen (O(keys)).
    _known: pd.MultiIndex | None = field(default=None, repr=False)
    _q: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)), repr=False)

    def __post_init__(self) -> None:
        if self.n_folds < 2:
            raise ValueError("cross-fitting needs at least two folds")
        if self.alpha <= 0:
            raise ValueError("alpha must be > 0")

    def update(self, keys: pd.DataFrame, fold: np.ndarray, reward: np.ndarray) -> None:
        """Add logged actions (their keys, folds and rewards) to the per-fold sums."""
        frame = keys.loc[:, list(KEY_COLUMNS)].assign(
            fold=fold, total=np.asarray(reward, dtype=float), count=1.0
        )
        part = frame.groupby(["fold", *KEY_COLUMNS], sort=False, dropna=False)[
            ["total", "count"]
        ].sum()
        self.sums = part if self.sums is None else self.sums.add(part, fill_value=0.0)
        self.models = []

    def merge(self, other: CrossFitRewardModel) -> CrossFitRewardModel:
        """Both models' sums together (unfitted; a new model)."""
        if (other.n_folds, other.alpha) != (self.n_folds, self.alpha):
            raise ValueError("cannot merge reward models with different folds or alpha")
        if self.sums is None or other.sums is None:
            sums = other.sums if self.sums is None else self.sums
        else:
            sums = self.sums.add(other.sums, fill_value=0.0)
        return CrossFitRewardModel(self.n_folds, self.alpha, sums)

    def fit(self) -> CrossFitRewardModel:
        """Fit fold k's ridge model on the sums of every other fold; returns self."""
        if self.sums is None:
            raise ValueError("the reward model has seen no data")
        flat = self.sums.reset_index()
        # Only the hashed columns some key uses: the solver's cost follows them, not 2²⁰.
        self.columns = np.unique(_features(flat.drop_duplicates(list(KEY_COLUMNS))).indices)
        self.models, self._known, self._q = [], None, np.zeros((0, self.n_folds))
        for k in range(self.n_folds):
            train = flat[flat["fold"] != k].groupby(list(KEY_COLUMNS), dropna=False)
            agg = train[["total", "count"]].sum().reset_index()
            if agg.empty:
                raise ValueError(f"fold {k}: no training rows outside it (too few decisions)")
            model = Ridge(alpha=self.alpha, solver="sparse_cg", tol=1e-10)
            model.fit(
                _compact(_features(agg), self.columns),
                agg["total"] / agg["count"],
                sample_weight=agg["count"].to_numpy(),
            )
            self.models.append(model)
        return self

    def predict(self, keys: pd.DataFrame, fold: np.ndarray) -> np.ndarray:
        """q̂ of each row of keys by the model of the folds other than the row's own."""
        if not self.models:
            raise ValueError("fit the reward model before predicting")
        index = pd.MultiIndex.from_frame(keys.loc[:, list(KEY_COLUMNS)])
        codes = self._codes(index)
        return self._q[codes, np.asarray(fold, dtype=np.int64)]

    def _codes(self, index: pd.MultiIndex) -> np.ndarray:
        """Rows of the prediction cache for each key, predicting (every fold) keys not yet seen."""
        codes = np.full(len(index), -1) if self._known is None else self._known.get_indexer(index)
        if (codes >= 0).all():
            return codes
        new = index[codes < 0].unique()
        x = _compact(_features(new.to_frame(index=False)), self.columns)
        self._q = np.vstack([self._q, np.column_stack([m.predict(x) for m in self.models])])
        self._known = new if self._known is None else self._known.append(new)
        return self._known.get_indexer(index)
