"""Binary classification metrics (scikit-learn), the validation-chosen threshold, bootstrap CIs.

The positive class is the second class in sorted order (PNEUMONIA for the Kermany data);
``prob`` is the predicted probability of it.
"""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

BOOTSTRAP_RESAMPLES = 1000


def choose_threshold(y_true, prob) -> float:
    """The threshold maximising Youden's J (sensitivity + specificity - 1) on validation data."""
    y_true, prob = np.asarray(y_true), np.asarray(prob)
    if len(np.unique(y_true)) < 2:
        return 0.5
    fpr, tpr, thresholds = skm.roc_curve(y_true, prob)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))


def _auc(y_true, prob) -> float:
    return float(skm.roc_auc_score(y_true, prob)) if len(np.unique(y_true)) == 2 else float("nan")


def _rates(tn, fp, fn, tp) -> dict:
    """Accuracy, sensitivity, specificity, F1 from confusion counts (arrays welcome)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        n = tn + fp + fn + tp
        return {
            "accuracy": (tp + tn) / n,
            "sensitivity": np.where(tp + fn > 0, tp / (tp + fn), 0.0),
            "specificity": np.where(tn + fp > 0, tn / (tn + fp), 0.0),
            "f1": np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0),
        }


def bootstrap_ci(y_true, prob, threshold: float, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """95 % percentile intervals from a class-stratified bootstrap (each class resampled apart)."""
    y_true, prob = np.asarray(y_true), np.asarray(prob)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y_true == 1), np.flatnonzero(y_true == 0)
    if len(pos) == 0 or len(neg) == 0:
        return {}
    idx = np.concatenate(
        [rng.choice(pos, (resamples, len(pos))), rng.choice(neg, (resamples, len(neg)))], axis=1
    )
    yt, pred = y_true[idx], prob[idx] >= threshold
    tp = (pred & (yt == 1)).sum(1)
    fp = (pred & (yt == 0)).sum(1)
    fn = (~pred & (yt == 1)).sum(1)
    tn = (~pred & (yt == 0)).sum(1)
    samples = _rates(tn, fp, fn, tp)
    samples["auc"] = np.array([_auc(yt[i], prob[idx[i]]) for i in range(resamples)])
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in samples.items()}


def classification_report(y_true, prob, threshold: float, classes: list[str], ci_seed: int = 0) -> dict:
    """The per-split block of results.json."""
    y_true, prob = np.asarray(y_true), np.asarray(prob)
    pred = (prob >= threshold).astype(int)
    cm = skm.confusion_matrix(y_true, pred, labels=[0, 1])
    (tn, fp), (fn, tp) = cm
    rates = _rates(tn, fp, fn, tp)
    return {
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, pred)),
        "precision": float(skm.precision_score(y_true, pred, zero_division=0)),
        "recall": float(skm.recall_score(y_true, pred, zero_division=0)),
        "specificity": float(rates["specificity"]),
        "f1": float(skm.f1_score(y_true, pred, zero_division=0)),
        "auc": _auc(y_true, prob),
        "confusion_matrix": cm.tolist(),
        "labels": list(classes),
        "ci95": bootstrap_ci(y_true, prob, threshold, seed=ci_seed),
    }


def roc_points(y_true, prob, max_points: int = 200) -> dict:
    """ROC curve thinned to at most ``max_points`` (for the UI and the report)."""
    fpr, tpr, thr = skm.roc_curve(y_true, prob, drop_intermediate=True)
    thr = np.minimum(thr, 1.0)  # sklearn's first threshold is +inf
    if len(fpr) > max_points:
        keep = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
        fpr, tpr, thr = fpr[keep], tpr[keep], thr[keep]
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thr.tolist()}
