import numpy as np
import pytest
from sklearn.metrics import f1_score

from pneumonia_kfp.metrics import (
    TARGET_SENSITIVITY,
    THRESHOLD_RULES,
    bootstrap_ci,
    choose_threshold,
    classification_report,
    rates_at,
    roc_points,
    sensitivity_threshold,
    thresholds,
    weighted_auc,
)


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
    assert r["sensitivity"] == pytest.approx(tp / (tp + fn))
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
                       ("sensitivity", r["sensitivity"]), ("specificity", r["specificity"])):
        lo, hi = ci[key]
        assert lo < point < hi and hi - lo < 0.25
    small = bootstrap_ci(y[:60], prob[:60], 0.5, seed=3)
    assert small["auc"][1] - small["auc"][0] > ci["auc"][1] - ci["auc"][0]  # fewer samples, wider


def test_roc_points_are_finite_and_thinned():
    y, prob = _scores(5000)
    roc = roc_points(y, prob, max_points=50)
    assert len(roc["fpr"]) <= 50 and roc["fpr"][0] == 0 and roc["tpr"][-1] == 1
    assert all(0 <= t <= 1 for t in roc["thresholds"])


def test_sensitivity_rule_is_the_highest_threshold_reaching_the_target():
    y, prob = _scores()
    t = sensitivity_threshold(y, prob)
    sens = lambda thr: ((prob >= thr) & (y == 1)).sum() / (y == 1).sum()  # noqa: E731
    assert sens(t) >= TARGET_SENSITIVITY
    higher = np.unique(prob[prob > t])
    assert higher.size and sens(higher.min()) < TARGET_SENSITIVITY  # the next candidate up falls short
    assert rates_at(y, prob, t)["sensitivity"] == pytest.approx(sens(t))


def test_every_rule_has_a_threshold():
    y, prob = _scores()
    rules = thresholds(y, prob)
    assert tuple(rules) == THRESHOLD_RULES and rules["balanced"] == 0.5
    assert rules["youden"] == choose_threshold(y, prob) and rules["sensitivity95"] == sensitivity_threshold(y, prob)
    assert thresholds([1, 1, 1], [0.2, 0.4, 0.9]) == {"balanced": 0.5, "youden": 0.5, "sensitivity95": 0.5}


def test_patient_bootstrap_resamples_whole_patients():
    """Four images per patient with the same prediction: resampling images treats them as
    independent and gives too narrow an interval; resampling patients does not."""
    y1, p1 = _scores(100, seed=4)
    y, prob = np.repeat(y1, 4), np.repeat(p1, 4)
    patients = np.repeat([f"person{i}" for i in range(100)], 4)
    per_image = bootstrap_ci(y, prob, 0.5, seed=1)
    per_patient = bootstrap_ci(y, prob, 0.5, seed=1, groups=patients)
    for key in ("accuracy", "auc", "sensitivity"):
        assert per_patient[key][1] - per_patient[key][0] > 1.5 * (per_image[key][1] - per_image[key][0])
    # a patient of its own per image is the image bootstrap
    singletons = [f"f{i:03d}" for i in range(100)]
    assert bootstrap_ci(y1, p1, 0.5, seed=2, groups=singletons) == bootstrap_ci(y1, p1, 0.5, seed=2)
    r = classification_report(y, prob, 0.5, ["a", "b"], groups=patients)
    assert r["bootstrap"] == {"unit": "patient", "clusters": 100}
    assert classification_report(y1, p1, 0.5, ["a", "b"])["bootstrap"] == {"unit": "image", "clusters": 100}


def test_patient_bootstrap_keeps_each_resample_to_whole_patients():
    from pneumonia_kfp.metrics import _cluster_weights

    y = np.array([0, 0, 0, 1, 1, 1, 1])
    groups = ["a", "a", "b", "c", "c", "c", "d"]
    w, n = _cluster_weights(y, groups, 200, np.random.default_rng(0))
    assert n == 4 and w.shape == (200, 7)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 3] == w[:, 4]).all() and (w[:, 4] == w[:, 5]).all()
    # each class keeps its number of patients: 2 negative, 2 positive draws
    assert ((w[:, 0] + w[:, 2]) == 2).all() and ((w[:, 3] + w[:, 6]) == 2).all()


def test_weighted_auc_is_sklearns_with_sample_weights():
    from sklearn.metrics import roc_auc_score

    y, prob = _scores(300, seed=5)
    prob = np.round(prob, 2)  # many ties
    w = np.random.default_rng(0).integers(0, 4, (6, 300)).astype(float)
    expected = [roc_auc_score(y, prob, sample_weight=row) for row in w]
    np.testing.assert_allclose(weighted_auc(y, prob, w), expected, rtol=1e-12)
