import numpy as np
import pytest
from sklearn.metrics import f1_score

from pneumonia_kfp.metrics import bootstrap_ci, choose_threshold, classification_report, roc_points


def _scores(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.7).astype(int)
    prob = np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)
    return y, prob


def test_report_matches_its_confusion_matrix():
    y, prob = _scores()
    r = classification_report(y, prob, 0.5, ["NORMAL", "PNEUMONIA"])
    (tn, fp), (fn, tp) = r["confusion_matrix"]
    assert tn + fp + fn + tp == r["n"] == len(y)
    assert tn + fp == (y == 0).sum()  # rows are the true class
    assert r["accuracy"] == pytest.approx((tn + tp) / len(y))
    assert r["recall"] == pytest.approx(tp / (tp + fn))
    assert r["specificity"] == pytest.approx(tn / (tn + fp))
    assert r["precision"] == pytest.approx(tp / (tp + fp))
    assert r["f1"] == pytest.approx(f1_score(y, prob >= 0.5))
    assert r["labels"] == ["NORMAL", "PNEUMONIA"] and 0.5 < r["auc"] < 1


def test_threshold_maximises_youden_on_validation():
    from sklearn.metrics import confusion_matrix

    y, prob = _scores()

    def youden(thr):
        (tn, fp), (fn, tp) = confusion_matrix(y, prob >= thr, labels=[0, 1])
        return tp / (tp + fn) + tn / (tn + fp) - 1

    t = choose_threshold(y, prob)
    assert all(youden(t) >= youden(other) - 1e-9 for other in np.linspace(0.01, 0.99, 99))
    assert youden(t) > youden(0.5)  # the default threshold is not the best here


def test_bootstrap_intervals_are_seeded_and_cover_the_estimate():
    y, prob = _scores()
    ci = bootstrap_ci(y, prob, 0.5, seed=3)
    assert ci == bootstrap_ci(y, prob, 0.5, seed=3)
    r = classification_report(y, prob, 0.5, ["a", "b"])
    for key, point in (("accuracy", r["accuracy"]), ("f1", r["f1"]), ("auc", r["auc"]),
                       ("sensitivity", r["recall"]), ("specificity", r["specificity"])):
        lo, hi = ci[key]
        assert lo < point < hi and hi - lo < 0.25
    small = bootstrap_ci(y[:60], prob[:60], 0.5, seed=3)
    assert small["auc"][1] - small["auc"][0] > ci["auc"][1] - ci["auc"][0]  # fewer samples, wider


def test_roc_points_are_finite_and_thinned():
    y, prob = _scores(5000)
    roc = roc_points(y, prob, max_points=50)
    assert len(roc["fpr"]) <= 50 and roc["fpr"][0] == 0 and roc["tpr"][-1] == 1
    assert all(0 <= t <= 1 for t in roc["thresholds"])
