"""Binary classification metrics (scikit-learn), validation-chosen thresholds, bootstrap CIs.

The positive class is the second class in sorted order (PNEUMONIA for the Kermany data);
``prob`` is the predicted probability of it.

Threshold rules (each applied to validation predictions, never to test):
- ``balanced``: 0.5. Training weighs the classes equally (class-balanced loss), so 0.5 is the
  point where the model finds both classes equally likely under equal priors; it takes nothing
  from the validation set, so it carries no selection noise and no tuning to an easy validation set.
- ``youden``: maximises sensitivity + specificity - 1 on validation.
- ``sensitivity95``: the highest threshold with validation sensitivity >= TARGET_SENSITIVITY
  (the best specificity a screening use that must miss few pneumonias gets).
"""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from pneumonia_kfp.params import THRESHOLD_RULES  # noqa: F401  (the rules' names, defined with the parameters)

BOOTSTRAP_RESAMPLES = 1000
TARGET_SENSITIVITY = 0.95


def choose_threshold(y_true, prob) -> float:
    """The threshold maximising Youden's J (sensitivity + specificity - 1) on validation data."""
    y_true, prob = np.asarray(y_true), np.asarray(prob)
    if len(np.unique(y_true)) < 2:
        return 0.5
    fpr, tpr, thresholds = skm.roc_curve(y_true, prob)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))


def sensitivity_threshold(y_true, prob, target: float = TARGET_SENSITIVITY) -> float:
    """The highest threshold whose sensitivity on (validation) data reaches ``target``."""
    y_true, prob = np.asarray(y_true), np.asarray(prob)
    if len(np.unique(y_true)) < 2:
        return 0.5
    _, tpr, thresholds = skm.roc_curve(y_true, prob, drop_intermediate=False)
    return float(min(thresholds[int(np.argmax(tpr >= target))], 1.0))


def thresholds(y_true, prob) -> dict[str, float]:
    """{rule: threshold} for every rule in THRESHOLD_RULES, from validation labels and probabilities."""
    return {"balanced": 0.5, "youden": choose_threshold(y_true, prob),
            "sensitivity95": sensitivity_threshold(y_true, prob)}


def auc(y_true, prob) -> float:
    """ROC AUC; NaN when only one class is present."""
    return float(skm.roc_auc_score(y_true, prob)) if len(np.unique(y_true)) == 2 else float("nan")



def _rates(tn, fp, fn, tp) -> dict:
    """Accuracy, sensitivity, specificity, F1 from confusion counts (arrays welcome); 0/0 counts as 0."""
    tn, fp, fn, tp = (np.asarray(v, dtype=float) for v in (tn, fp, fn, tp))  # plain ints would raise on 0/0
    with np.errstate(divide="ignore", invalid="ignore"):
        n = tn + fp + fn + tp
        return {
            "accuracy": (tp + tn) / n,
            "sensitivity": np.where(tp + fn > 0, tp / (tp + fn), 0.0),
            "specificity": np.where(tn + fp > 0, tn / (tn + fp), 0.0),
            "f1": np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0),
        }


def _cluster_weights(y_true, groups, resamples: int, rng) -> tuple[np.ndarray, int]:
    """Resamples × images matrix of how often each image is drawn, and the number of clusters.

    A cluster is a patient (all of their images are drawn together); the clusters of each class
    (a patient with any positive image counts as positive) are resampled apart, with replacement.
    """
    if groups is None:
        gid = np.arange(len(y_true))
    else:
        _, gid = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    n_groups = int(gid.max()) + 1
    positive = np.zeros(n_groups, bool)
    np.logical_or.at(positive, gid, y_true == 1)
    counts = np.zeros((resamples, n_groups))
    for stratum in (np.flatnonzero(positive), np.flatnonzero(~positive)):
        drawn = rng.choice(stratum, (resamples, len(stratum)))
        np.add.at(counts, (np.arange(resamples)[:, None], drawn), 1)
    return counts[:, gid], n_groups


def weighted_auc(y_true, prob, weights) -> np.ndarray:
    """ROC AUC of every row of ``weights`` (resamples × images) at once: the weighted chance that a
    positive outranks a negative, ties counting half -- what roc_auc_score(sample_weight=row) gives."""
    from scipy import sparse

    y_true, prob, weights = np.asarray(y_true), np.asarray(prob), np.atleast_2d(weights)
    _, rank = np.unique(prob, return_inverse=True)  # tied probabilities share a rank
    one_hot = sparse.csr_matrix((np.ones(len(prob)), (np.arange(len(prob)), rank)))
    pos, neg = weights * (y_true == 1), weights * (y_true == 0)
    neg_at = np.asarray(neg @ one_hot)  # resamples × ranks: negative weight at each probability
    below = np.cumsum(neg_at, axis=1) - neg_at
    wins = (pos * (below[:, rank] + 0.5 * neg_at[:, rank])).sum(1)
    return wins / (pos.sum(1) * neg.sum(1))


def bootstrap_ci(y_true, prob, threshold: float, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                 groups=None) -> dict:
    """95 % percentile intervals from a class-stratified bootstrap (each class resampled apart).

    With ``groups`` (patient ids), whole patients are resampled: one patient's images are not
    independent, and resampling images would make the intervals too narrow.
    """
    y_true, prob = np.asarray(y_true), np.asarray(prob)
    if not (y_true == 1).any() or not (y_true == 0).any():
        return {}
    w, _ = _cluster_weights(y_true, groups, resamples, np.random.default_rng(seed))
    pred, pos = prob >= threshold, y_true == 1
    tp, fn = (w * (pred & pos)).sum(1), (w * (~pred & pos)).sum(1)
    fp, tn = (w * (pred & ~pos)).sum(1), (w * (~pred & ~pos)).sum(1)
    samples = _rates(tn, fp, fn, tp)
    samples["auc"] = weighted_auc(y_true, prob, w)
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in samples.items()}


def undefined(y_true) -> set[str]:
    """The figures that have no value on these labels: with no positive image, sensitivity (recall) and
    F1 (of the positive class); with no negative one, specificity; with either missing, AUC."""
    y_true = np.asarray(y_true)
    out = set()
    if not (y_true == 1).any():
        out |= {"sensitivity", "f1", "auc"}
    if not (y_true == 0).any():
        out |= {"specificity", "auc"}
    return out


def classification_report(y_true, prob, threshold: float, classes: list[str], ci_seed: int = 0,
                          groups=None) -> dict:
    """The per-split block of results.json; ``groups`` (patient ids) make the bootstrap patient-level.
    A figure the labels leave undefined (one class only: see ``undefined``) is None (JSON null), and
    the block lists them under ``undefined``."""
    y_true, prob = np.asarray(y_true), np.asarray(prob)
    pred = (prob >= threshold).astype(int)
    cm = skm.confusion_matrix(y_true, pred, labels=[0, 1])
    (tn, fp), (fn, tp) = cm
    rates = _rates(tn, fp, fn, tp)
    clusters = len(set(map(str, groups))) if groups is not None else len(y_true)
    block = {
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, pred)),
        "precision": float(skm.precision_score(y_true, pred, zero_division=0)),
        "sensitivity": float(rates["sensitivity"]),  # recall of the positive class
        "specificity": float(rates["specificity"]),
        "f1": float(skm.f1_score(y_true, pred, zero_division=0)),
        "auc": auc(y_true, prob),
        "confusion_matrix": cm.tolist(),
        "labels": list(classes),
        "ci95": bootstrap_ci(y_true, prob, threshold, seed=ci_seed, groups=groups),
        "bootstrap": {"unit": "patient" if clusters < len(y_true) else "image", "clusters": clusters},
    }
    missing = undefined(y_true)
    if missing:
        block.update({k: None for k in missing if k in block})
        block["undefined"] = sorted(k for k in missing if k in block)
    return block


def rates_at(y_true, prob, threshold: float) -> dict:
    """Accuracy, sensitivity, specificity and F1 at one threshold (an operating point's figures); None
    for a figure the labels leave undefined."""
    y_true, pred = np.asarray(y_true), np.asarray(prob) >= threshold
    pos = y_true == 1
    r = _rates(*(int(v) for v in ((~pred & ~pos).sum(), (pred & ~pos).sum(), (~pred & pos).sum(), (pred & pos).sum())))
    missing = undefined(y_true)
    return {k: None if k in missing else float(v) for k, v in r.items()}


def roc_points(y_true, prob, max_points: int = 200) -> dict:
    """ROC curve thinned to at most ``max_points`` (for the UI and the report); empty with one class."""
    if len(np.unique(np.asarray(y_true))) < 2:  # no curve: one of its axes would be 0/0
        return {"fpr": [], "tpr": [], "thresholds": []}
    fpr, tpr, thr = skm.roc_curve(y_true, prob, drop_intermediate=True)
    thr = np.minimum(thr, 1.0)  # sklearn's first threshold is +inf
    if len(fpr) > max_points:
        keep = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
        fpr, tpr, thr = fpr[keep], tpr[keep], thr[keep]
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thr.tolist()}
