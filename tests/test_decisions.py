"""The decisions in metrics and report, pinned by numbers the tests work out themselves.

Each expected value comes from first principles (counting) or straight from scikit-learn on the
same inputs, never from the function under test.
"""
import copy
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from pneumonia_kfp.documents import RESULT_FORMAT, RESULTS_FORMAT
from pneumonia_kfp.evaluation import BEST_RULE, combine
from pneumonia_kfp.metrics import (
    bootstrap_ci,
    choose_threshold,
    classification_report,
    rates_at,
    roc_points,
    sensitivity_threshold,
)
from pneumonia_kfp.report import markdown

CLASSES = ["NORMAL", "PNEUMONIA"]


def youden_threshold(y, prob) -> float:
    """Youden's J straight from scikit-learn's ROC: the threshold where tpr - fpr is largest."""
    fpr, tpr, thresholds = roc_curve(y, prob)
    return float(min(thresholds[int(np.argmax(tpr - fpr))], 1.0))


def counts(y, prob, threshold):
    """(TN, FP, FN, TP) with 'positive' meaning prob >= threshold, counted by hand."""
    y, pred = np.asarray(y), np.asarray(prob) >= threshold
    return (int(((y == 0) & ~pred).sum()), int(((y == 0) & pred).sum()),
            int(((y == 1) & ~pred).sum()), int(((y == 1) & pred).sum()))


def test_threshold_is_youdens_j_from_the_roc_curve():
    rng = np.random.default_rng(7)
    y = np.r_[np.zeros(60, int), np.ones(40, int)]
    prob = np.clip(np.r_[rng.normal(0.35, 0.15, 60), rng.normal(0.6, 0.15, 40)], 0, 1)
    t = choose_threshold(y, prob)
    assert t == pytest.approx(youden_threshold(y, prob))
    assert t != 0.5 and t in prob  # a real operating point of the data, not a default


def test_threshold_picks_the_best_j_on_a_hand_made_example():
    # negatives .1 .2 .4 .5, positives .3 .6 .7: J (tpr - fpr) is 2/3 at .6 (2 of 3 positives, no
    # negative), 1 - 2/4 at .3, 2/3 - 1/4 at .5: the best operating point is .6
    y = [0, 0, 1, 0, 0, 1, 1]
    prob = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    assert choose_threshold(y, prob) == pytest.approx(0.6)
    # perfectly separable: the lowest positive score separates them
    assert choose_threshold([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == pytest.approx(0.8)
    # one class only: no ROC, the neutral 0.5
    assert choose_threshold([1, 1, 1], [0.2, 0.4, 0.9]) == 0.5
    assert choose_threshold([0, 0], [0.2, 0.4]) == 0.5


def test_an_inverted_model_gets_the_never_positive_threshold_clipped_to_one():
    # every positive scores below every negative: no threshold beats J = 0 of the ROC's first point,
    # whose threshold is +inf; a probability threshold stays within [0, 1]
    y, prob = [1, 0, 1, 0], [0.2, 0.8, 0.1, 0.9]
    assert youden_threshold(y, prob) == 1.0
    assert choose_threshold(y, prob) == 1.0


def test_a_sample_exactly_at_the_threshold_is_positive():
    y = np.array([0, 0, 1, 1, 0, 1])
    prob = np.array([0.1, 0.4, 0.4, 0.9, 0.39999, 0.40001])
    r = classification_report(y, prob, 0.4, CLASSES)
    # 0.4 is positive (>=): the negative at 0.4 is a false positive, the positive at 0.4 a true positive
    assert r["confusion_matrix"] == [[2, 1], [0, 3]]
    assert counts(y, prob, 0.4) == (2, 1, 0, 3)
    assert r["sensitivity"] == 1.0 and r["specificity"] == pytest.approx(2 / 3)
    assert r["precision"] == pytest.approx(3 / 4) and r["accuracy"] == pytest.approx(5 / 6)
    assert r["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 0))
    assert r["auc"] == pytest.approx(roc_auc_score(y, prob))
    assert r["n"] == 6 and r["labels"] == CLASSES


def test_bootstrap_counts_a_sample_at_the_threshold_as_positive():
    # every positive sits exactly on the threshold, every negative below: perfect at >=, useless at >
    y = np.r_[np.zeros(30, int), np.ones(30, int)]
    prob = np.r_[np.full(30, 0.2), np.full(30, 0.7)]
    ci = bootstrap_ci(y, prob, 0.7, resamples=50)
    assert ci["sensitivity"] == [1.0, 1.0] and ci["specificity"] == [1.0, 1.0]
    assert ci["accuracy"] == [1.0, 1.0] and ci["f1"] == [1.0, 1.0] and ci["auc"] == [1.0, 1.0]
    assert set(ci) == {"accuracy", "sensitivity", "specificity", "f1", "auc"}


def test_bootstrap_intervals_match_a_hand_computed_resample():
    """The same stratified resampling written out with numpy: the same percentiles."""
    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(40, int), np.ones(25, int)]
    prob = np.clip(np.r_[rng.normal(0.4, 0.2, 40), rng.normal(0.6, 0.2, 25)], 0, 1)
    ci = bootstrap_ci(y, prob, 0.5, resamples=200, seed=11)
    draw = np.random.default_rng(11)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    idx = np.concatenate([draw.choice(pos, (200, len(pos))), draw.choice(neg, (200, len(neg)))], axis=1)
    acc, sens, spec, f1, auc = [], [], [], [], []
    for row in idx:
        tn, fp, fn, tp = counts(y[row], prob[row], 0.5)
        acc.append((tp + tn) / len(row))
        sens.append(tp / (tp + fn))
        spec.append(tn / (tn + fp))
        f1.append(2 * tp / (2 * tp + fp + fn))
        auc.append(roc_auc_score(y[row], prob[row]))
    for key, values in (("accuracy", acc), ("sensitivity", sens), ("specificity", spec), ("f1", f1), ("auc", auc)):
        assert ci[key] == pytest.approx([np.percentile(values, 2.5), np.percentile(values, 97.5)]), key
    assert bootstrap_ci(y[y == 1], prob[y == 1], 0.5) == {}  # one class: no interval


def test_rates_without_a_class_are_zero_or_null_never_nan():
    # a resample can lack predicted positives: precision/F1 undefined -> 0, not a crash or NaN
    y = np.array([0, 0, 1, 1])
    r = classification_report(y, np.array([0.1, 0.2, 0.3, 0.4]), 0.9, CLASSES)
    assert r["confusion_matrix"] == [[2, 0], [2, 0]]
    assert r["f1"] == 0 and r["precision"] == 0 and r["sensitivity"] == 0 and r["specificity"] == 1
    assert "undefined" not in r  # both classes present: every figure has a value
    # labels of one class: what needs the other class is null (valid JSON), the rest has its value
    no_positives = classification_report(np.array([0, 0]), np.array([0.2, 0.7]), 0.5, CLASSES)
    assert no_positives["sensitivity"] is None and no_positives["f1"] is None and no_positives["auc"] is None
    assert no_positives["precision"] == 0 and no_positives["specificity"] == 0.5 and no_positives["accuracy"] == 0.5
    assert no_positives["undefined"] == ["auc", "f1", "sensitivity"]
    one_class = classification_report(np.array([1, 1]), np.array([0.6, 0.7]), 0.5, CLASSES)
    assert one_class["auc"] is None and one_class["specificity"] is None and one_class["ci95"] == {}
    assert one_class["sensitivity"] == 1 and one_class["f1"] == 1 and one_class["undefined"] == ["auc", "specificity"]
    json.dumps([no_positives, one_class], allow_nan=False)  # strict JSON: no NaN anywhere
    assert rates_at(np.array([1, 1, 1]), np.array([0.2, 0.6, 0.7]), 0.5) == {
        "accuracy": pytest.approx(2 / 3), "sensitivity": pytest.approx(2 / 3), "specificity": None,
        "f1": pytest.approx(0.8)}
    assert rates_at(np.array([0, 0]), np.array([0.2, 0.7]), 0.5) == {
        "accuracy": 0.5, "sensitivity": None, "specificity": 0.5, "f1": None}
    assert roc_points(np.array([1, 1]), np.array([0.2, 0.7])) == {"fpr": [], "tpr": [], "thresholds": []}
    ci = bootstrap_ci(y, np.array([0.1, 0.2, 0.3, 0.4]), 0.9, resamples=20)
    assert ci["f1"] == [0.0, 0.0] and ci["sensitivity"] == [0.0, 0.0] and ci["specificity"] == [1.0, 1.0]


def test_roc_points_keep_the_ends_and_clip_the_infinite_threshold():
    rng = np.random.default_rng(0)
    y = (rng.random(3000) < 0.5).astype(int)
    prob = np.clip(0.3 * y + 0.7 * rng.random(3000), 0, 1)
    fpr, tpr, thr = roc_curve(y, prob, drop_intermediate=True)
    full = roc_points(y, prob, max_points=10_000)
    assert full["fpr"] == pytest.approx(fpr.tolist()) and full["tpr"] == pytest.approx(tpr.tolist())
    assert full["thresholds"][0] == 1.0 and full["thresholds"][1:] == pytest.approx(thr[1:].tolist())
    thin = roc_points(y, prob, max_points=7)
    assert len(thin["fpr"]) == 7
    assert (thin["fpr"][0], thin["tpr"][0]) == (0.0, 0.0) and (thin["fpr"][-1], thin["tpr"][-1]) == (1.0, 1.0)
    keep = np.linspace(0, len(fpr) - 1, 7).round().astype(int)
    assert thin["fpr"] == pytest.approx(fpr[keep].tolist())
    exact = roc_points(y, prob, max_points=len(fpr))  # exactly at the limit: nothing dropped
    assert len(exact["fpr"]) == len(fpr)


def hand_rates(tn, fp, fn, tp) -> dict:
    """The four rates from counts, a 0/0 counted as 0 (written out case by case)."""
    n = tn + fp + fn + tp
    return {"accuracy": (tp + tn) / n,
            "sensitivity": tp / (tp + fn) if tp + fn else 0.0,
            "specificity": tn / (tn + fp) if tn + fp else 0.0,
            "f1": 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0}


@pytest.mark.parametrize("y, prob", [
    ([0, 0, 0, 1, 1], [0.1, 0.6, 0.7, 0.2, 0.8]),  # every count differs: TN 1, FP 2, FN 1, TP 1
    ([0, 1, 1, 1, 1], [0.1, 0.6, 0.2, 0.1, 0.3]),  # false negatives outnumber 2 TP + FP
    ([0, 0, 0, 0, 1], [0.9, 0.6, 0.7, 0.2, 0.8]),  # false positives outnumber 2 TP + FN
    ([1], [0.9]),  # a single positive, found
    ([0], [0.1]),  # a single negative, rejected
    ([0, 0], [0.2, 0.7]),  # no positives: sensitivity 0/0
    ([0, 0], [0.1, 0.2]),  # no positives, none predicted: sensitivity and F1 0/0
    ([1, 1], [0.1, 0.2]),  # no negatives: specificity 0/0
])
def test_operating_point_rates_are_counted_and_null_when_undefined(y, prob):
    got = rates_at(y, prob, 0.5)
    want = hand_rates(*counts(y, prob, 0.5))
    if 1 not in y:  # nothing to find: sensitivity, and the positive class's F1, have no value
        want.update(sensitivity=None, f1=None)
    if 0 not in y:  # no negatives: specificity has none
        want.update(specificity=None)
    assert got == pytest.approx(want)
    assert all(isinstance(got[k], float) for k in want if want[k] is not None)


def test_report_of_a_split_with_nothing_to_find_and_nothing_found():
    r = classification_report(np.array([0, 0]), np.array([0.1, 0.2]), 0.5, CLASSES)
    assert r["confusion_matrix"] == [[2, 0], [0, 0]]
    assert (r["f1"], r["precision"], r["sensitivity"], r["specificity"], r["accuracy"]) == (None, 0, None, 1, 1)


def test_the_reports_interval_is_the_seeded_patient_bootstrap_of_that_split():
    rng = np.random.default_rng(5)
    y = np.r_[np.zeros(30, int), np.ones(30, int)]
    prob = np.clip(np.r_[rng.normal(0.4, 0.2, 30), rng.normal(0.6, 0.2, 30)], 0, 1)
    patients = [f"p{i // 3}" for i in range(60)]  # three images a patient
    r = classification_report(y, prob, 0.5, CLASSES, ci_seed=4, groups=patients)
    assert r["ci95"] == bootstrap_ci(y, prob, 0.5, seed=4, groups=patients)
    assert r["ci95"] != bootstrap_ci(y, prob, 0.5, seed=4)  # patients, not images, were resampled
    assert r["ci95"] != bootstrap_ci(y, prob, 0.5, seed=5, groups=patients)  # the seed given, not another
    again = classification_report(y, prob, 0.5, CLASSES, ci_seed=4, groups=patients)
    assert again["ci95"] == r["ci95"] and r["bootstrap"] == {"unit": "patient", "clusters": 20}
    assert classification_report(y, prob, 0.5, CLASSES)["ci95"] == classification_report(y, prob, 0.5, CLASSES)["ci95"]


def test_bootstrap_of_a_split_without_positives_has_no_interval():
    assert bootstrap_ci(np.zeros(6, int), np.linspace(0, 1, 6), 0.5) == {}
    assert bootstrap_ci(np.ones(6, int), np.linspace(0, 1, 6), 0.5) == {}


def test_sensitivity_rule_stops_inside_a_run_of_positives():
    # 20 positives above every negative: the ROC climbs straight up, and 19 of 20 (exactly 0.95) is
    # reached at the 19th highest positive -- a point of that vertical run, not its top or bottom
    positives = np.linspace(0.99, 0.80, 20)
    y = np.r_[np.zeros(10, int), np.ones(20, int)]
    prob = np.r_[np.linspace(0.1, 0.3, 10), positives]
    t = sensitivity_threshold(y, prob)
    assert t == pytest.approx(positives[18])
    assert ((prob >= t) & (y == 1)).sum() == 19 and ((prob >= t) & (y == 0)).sum() == 0
    # a target of 0 is met before any image is called positive: the ROC's +inf start, clipped to 1
    assert sensitivity_threshold(y, prob, target=0.0) == 1.0


def test_roc_points_default_to_at_most_200():
    rng = np.random.default_rng(1)
    y = (rng.random(5000) < 0.5).astype(int)
    prob = np.clip(0.2 * y + 0.8 * rng.random(5000), 0, 1)
    assert len(roc_curve(y, prob)[0]) > 200
    assert len(roc_points(y, prob)["fpr"]) == 200


# --- best model: validation decides, test plays no part ---------------------------------------------


def _model(name: str, val_auc: float, val_f1: float, test_auc: float, test_f1: float) -> dict:
    block = {"n": 20, "accuracy": 0.8, "precision": 0.8, "sensitivity": 0.8, "specificity": 0.8, "confusion_matrix":
             [[8, 2], [2, 8]], "labels": CLASSES, "ci95": {}}
    # per-image predictions the report's ensemble averages: the same uninformative 0.5 for every image, so
    # the ensemble's validation AUC is 0.5 and it never outranks the models under test
    same = {"file": [f"{i}.png" for i in range(8)], "patient": [None] * 8, "label": [0, 1] * 4, "prob": [0.5] * 8}
    return {"format": RESULT_FORMAT, "backbone": name, "image_size": 32, "epochs": 2, "pretrained": False,
            "tta": False, "parameters": 1000, "threshold": 0.5, "threshold_rule": "balanced",
            "thresholds": {"balanced": 0.5}, "test": {**block, "auc": test_auc, "f1": test_f1},
            "val": {**block, "auc": val_auc, "f1": val_f1}, "operating_points": [],
            "roc": {"fpr": [0, 1], "tpr": [0, 1], "thresholds": [1, 0]},
            "train": {"seconds": 1.0, "images_per_second": 10.0, "best_epoch": 1, "history": [],
                      "val_source": "dataset val split"},
            "predictions": {"val": dict(same), "test": dict(same)}}


def best_by_hand(models: list[dict]) -> str:
    """Highest validation AUC; among equal AUCs the highest validation F1 (written out, no max/key)."""
    best = None
    for m in models:
        v = m["val"]
        if best is None or v["auc"] > best["val"]["auc"] or (
                v["auc"] == best["val"]["auc"] and v["f1"] > best["val"]["f1"]):
            best = m
    return best["backbone"]


@pytest.mark.parametrize("order", [0, 1, 2])
def test_best_model_follows_validation_when_test_disagrees(order):
    models = [
        _model("alpha", val_auc=0.91, val_f1=0.80, test_auc=0.70, test_f1=0.60),  # best on validation
        _model("beta", val_auc=0.85, val_f1=0.90, test_auc=0.99, test_f1=0.97),  # best on test
        _model("gamma", val_auc=0.60, val_f1=0.95, test_auc=0.95, test_f1=0.99),
    ]
    models = models[order:] + models[:order]  # the input order plays no part
    results = combine({"uri": "file:///x", "counts": {}}, copy.deepcopy(models))
    assert best_by_hand(models) == "alpha"
    assert results["best"] == {"backbone": "alpha", "rule": BEST_RULE}
    assert [m["backbone"] for m in results["models"]] == ["alpha", "beta", "gamma", "ensemble"]
    assert "**Best model: alpha**" in markdown(results)


def test_equal_validation_auc_goes_to_the_higher_validation_f1():
    models = [
        _model("first", val_auc=0.9, val_f1=0.70, test_auc=0.99, test_f1=0.99),
        _model("second", val_auc=0.9, val_f1=0.75, test_auc=0.50, test_f1=0.40),
        _model("third", val_auc=0.8, val_f1=0.99, test_auc=0.99, test_f1=0.99),
    ]
    assert best_by_hand(models) == "second"
    assert combine({}, models)["best"]["backbone"] == "second"
    assert combine({}, models[::-1])["best"]["backbone"] == "second"


def test_no_models_means_no_best():
    assert combine({"uri": "u"}, []) == {"format": RESULTS_FORMAT, "dataset": {"uri": "u"}, "models": [], "best": None}
