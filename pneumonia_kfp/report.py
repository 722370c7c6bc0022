"""report: every backbone's results side by side, as results.json, Markdown and self-contained HTML, and
one model's figures as the KFP UI's Metrics and ClassificationMetrics. It renders documents; it decides nothing."""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import re

import numpy as np

from pneumonia_kfp.documents import VAL_FROM_DATASET
from pneumonia_kfp.metrics import TARGET_SENSITIVITY
from pneumonia_kfp.params import default

log = logging.getLogger(__name__)

# The AIMI Lab1 seed's published figures, for reference only: its best epoch was picked on test.
SEED_REFERENCE = {"backbone": "resnext50_32x4d (seed, AIMI Lab1)", "accuracy": 0.9439, "f1": 0.9556}
RULE_NOTES = {
    "balanced": "0.5: training weighs both classes equally, so 0.5 takes nothing from validation",
    "youden": "maximises sensitivity + specificity − 1 on validation",
    "sensitivity95": f"highest threshold with validation sensitivity ≥ {TARGET_SENSITIVITY:.2f}",
}
SHIFT_NOTE = ("Thresholds come from validation only. The validation images come from the same source as "
              "train and are easier than a new hospital's: a threshold tuned on them tends to over-call "
              "pneumonia on shifted data (lower specificity), which is why the default rule takes nothing from them.")
PREDICTION_COLUMNS = ("split", "file", "patient", "label")


def without_predictions(results: dict) -> dict:
    return {**results, "models": [{k: v for k, v in m.items() if k != "predictions"} for m in results["models"]]}


def predictions_csv(results: dict) -> str:
    """split, file, patient, label, then ``prob_<model>`` for every backbone and the ensemble."""
    import csv

    models = results["models"]
    if not models:
        return ""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*PREDICTION_COLUMNS, *(f"prob_{m['backbone']}" for m in models)])
    classes = models[0]["test"]["labels"]
    for split, block in models[0]["predictions"].items():
        probs = [dict(zip(m["predictions"][split]["file"], m["predictions"][split]["prob"], strict=True))
                 if split in m["predictions"] else {} for m in models]
        for i, file in enumerate(block["file"]):
            writer.writerow([split, file, block["patient"][i] or "", classes[block["label"][i]],
                             *(f"{p[file]:.6f}" if file in p else "" for p in probs)])
    return buf.getvalue()


def confident_errors(model: dict, per_kind: int = 4) -> list[dict]:
    """The test errors the model was surest of at its threshold: false positives with the highest
    probability and false negatives with the lowest, ``per_kind`` of each."""
    block, t = model["predictions"]["test"], model["threshold"]
    rows = [{"file": f, "patient": p, "label": y, "prob": q}
            for f, p, y, q in zip(block["file"], block["patient"], block["label"], block["prob"], strict=True)]
    fp = sorted((r for r in rows if r["label"] == 0 and r["prob"] >= t), key=lambda r: -r["prob"])
    fn = sorted((r for r in rows if r["label"] == 1 and r["prob"] < t), key=lambda r: r["prob"])
    return fp[:per_kind] + fn[:per_kind]


UNDEFINED = "undefined"  # a figure the data leaves without a value (one class only): null in results.json


def _pct(x: float | None) -> str:
    return UNDEFINED if x is None else f"{100 * x:.2f}"


def _with_ci(block: dict, key: str, pct: bool = True) -> str:
    fmt = _pct if pct else (lambda v: UNDEFINED if v is None else f"{v:.4f}")
    ci = block["ci95"].get(key)  # none for a figure the data leaves undefined
    return f"{fmt(block[key])} ({fmt(ci[0])}–{fmt(ci[1])})" if ci and block[key] is not None else fmt(block[key])


def undefined_note(results: dict, split: str = "test") -> str:
    """A sentence naming the figures the data left undefined (a split of one class), or ''."""
    names = sorted({k for m in results["models"] for k in (m.get(split) or {}).get("undefined", [])})
    if not names:
        return ""
    counts = results["dataset"]["counts"].get(split, {})
    present = [c for c, n in counts.items() if n] or ["one class"]
    return (f"These images are all {' / '.join(present)}: {', '.join(names)} need images of both classes and "
            "are undefined (null in results.json).")


def _count(n) -> str:
    return "–" if not n else f"{n / 1e6:.1f} M"


def _settings(m: dict) -> str:
    rule = f"thr {m['threshold']:.3f} ({m['threshold_rule']})" + (", TTA" if m["tta"] else "")
    if m.get("members"):
        return f"mean probability of {' + '.join(m['members'])}, {rule}"
    return (f"{m['image_size']} px, {m['epochs']} ep (best {m['train']['best_epoch']}), "
            f"{'pretrained' if m['pretrained'] else 'scratch'}, {rule}")


def table_rows(results: dict, split: str = "test") -> list[list[str]]:
    rows = []
    for m in results["models"]:
        t = m.get(split)
        if not t:
            continue
        ips = m["train"]["images_per_second"]
        rows.append([
            m["backbone"], _count(m["parameters"]), _settings(m),
            _with_ci(t, "accuracy"), _with_ci(t, "f1", pct=False), _with_ci(t, "sensitivity"),
            _with_ci(t, "specificity"), _with_ci(t, "auc", pct=False), f"{m['val']['auc']:.4f}",
            f"{m['train']['seconds']:.0f} s", "–" if ips is None else f"{ips:.0f}",
        ])
    return rows


HEADER = ["backbone", "parameters", "settings", "accuracy % (95% CI)", "F1 (95% CI)", "sensitivity % (95% CI)",
          "specificity % (95% CI)", "AUC (95% CI)", "val AUC", "train time", "img/s"]
OP_HEADER = ["model", "rule", "threshold", "val sensitivity %", "val specificity %", "test accuracy %",
             "test F1", "test sensitivity %", "test specificity %"]
EXTERNAL_OP_HEADER = [h.replace("test", "external") for h in OP_HEADER]
SEED_NOTE = "published figures; best epoch selected on test in the original"


def seed_row(n_columns: int = len(HEADER)) -> list[str]:
    s = SEED_REFERENCE
    return [s["backbone"], "–", SEED_NOTE, _pct(s["accuracy"]), f"{s['f1']:.4f}"] + ["–"] * (n_columns - 5)


def operating_point_rows(results: dict, split: str = "test") -> list[list[str]]:
    rows = []
    for m in results["models"]:
        for op in m["operating_points"]:
            if split not in op:
                continue
            s = op[split]
            rows.append([m["backbone"], op["rule"] + (" (default)" if op["default"] else ""), f"{op['threshold']:.3f}",
                         _pct(op["val"]["sensitivity"]), _pct(op["val"]["specificity"]), _pct(s["accuracy"]),
                         UNDEFINED if s["f1"] is None else f"{s['f1']:.4f}", _pct(s["sensitivity"]),
                         _pct(s["specificity"])])
    return rows


def _ci_note(results: dict, split: str = "test") -> str:
    from pneumonia_kfp.metrics import BOOTSTRAP_RESAMPLES

    models = [m for m in results["models"] if m.get(split)]
    class_names = models[0][split]["labels"] if models else ["negative", "positive"]
    ns = sorted({m[split]["n"] for m in models})
    units = sorted({f"{m[split]['bootstrap']['clusters']} {m[split]['bootstrap']['unit']}s" for m in models
                    if "bootstrap" in m[split]})
    rule = models[0]["threshold_rule"] if models else default("threshold_rule")
    name = "Test split" if split == "test" else "External data"
    n = f" (n = {', '.join(map(str, ns))})" if ns else ""
    return (f"{name}{n}. 95% CI: class-stratified bootstrap of patients ({', '.join(units) or 'images'}; "
            "a file name without a patient id counts as its own patient), "
            f"{BOOTSTRAP_RESAMPLES:,} resamples (seeded). Decision threshold chosen on validation by the rule "
            f"'{rule}' ({RULE_NOTES.get(rule, rule)}). "
            f"Sensitivity = recall of {class_names[1]}, specificity = recall of {class_names[0]}.")


def _dataset_line(results: dict) -> str:
    d = results["dataset"]
    counts = ", ".join(f"{s}: " + " / ".join(f"{n} {c}" for c, n in cs.items())
                       for s, cs in d["counts"].items())
    if d.get("external"):
        return (f"External evaluation of `{d['model']}` on `{d['uri']}` ({counts}): the test "
                "columns score that data; validation figures and thresholds are the model's own, from training.")
    carved = " Test split carved from train (grouped by patient)." if d.get("test_carved_from_train") else ""
    # how each model was validated, as training recorded it (the ensemble has no training of its own)
    sources = sorted({m["train"]["val_source"] for m in results["models"] if not m.get("members")})
    if any(s != VAL_FROM_DATASET for s in sources):
        carved += (f" Validation: {'; '.join(sources)}: each model validated on a patient-grouped carve-out "
                   "of train + val instead of the dataset's val split (n in each model's val block).")
    return f"Dataset `{d['uri']}` ({counts}).{carved}"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(results: dict) -> str:
    lines = ["# Pneumonia classifier comparison", ""]
    if results["dataset"].get("synthetic"):
        lines += ["> **SYNTHETIC DATA: these numbers mean nothing about real X-rays.**", ""]
    lines += [_dataset_line(results), ""]
    lines += _md_table(HEADER, table_rows(results) + [seed_row()])
    lines += ["", _ci_note(results) + " The last row is the AIMI Lab1 seed's " + SEED_NOTE + ": not comparable."]
    if undefined_note(results):
        lines += ["", f"**{undefined_note(results)}**"]
    if results["best"]:
        lines += ["", f"**Best model: {results['best']['backbone']}** — rule: {results['best']['rule']}."]
    lines += ["", "## Operating points (thresholds chosen on validation, each with its test result)", "",
              *_md_table(OP_HEADER, operating_point_rows(results)), "", SHIFT_NOTE]
    if any(m.get("external") for m in results["models"]):
        note = undefined_note(results, "external")
        lines += ["", "## External data", "", *_md_table(HEADER, table_rows(results, "external")), "",
                  _ci_note(results, "external") + (f" **{note}**" if note else ""), "",
                  *_md_table(EXTERNAL_OP_HEADER, operating_point_rows(results, "external"))]
    lines += ["", "## Confusion matrices (test; rows true, columns predicted)", ""]
    for m in results["models"]:
        (tn, fp), (fn, tp) = m["test"]["confusion_matrix"]
        a, b = m["test"]["labels"]
        lines += [f"**{m['backbone']}**", "", f"| | pred {a} | pred {b} |", "|---|---|---|",
                  f"| true {a} | {tn} | {fp} |", f"| true {b} | {fn} | {tp} |", ""]
    return "\n".join(lines) + "\n"


MAX_HTML_BYTES = 2_000_000  # the KFP UI loads the HTML artifact whole into an iframe
DPIS = (80, 60, 45)  # figure resolutions tried, best first, until the page fits MAX_HTML_BYTES


def _png(fig, dpi: int, alt: str) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def figures(results: dict, dpi: int = DPIS[0]) -> dict[str, str]:
    """Inline PNGs: ROC curves overlaid, training curves and confusion matrix per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay

    out = {}
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for i, m in enumerate(results["models"]):
        t = m["test"]
        color, style = ("k", "--") if m.get("members") else (f"C{i % 10}", "-")  # the ensemble: black, dashed
        auc = UNDEFINED if t["auc"] is None else f"{t['auc']:.3f}"
        ax.plot(m["roc"]["fpr"], m["roc"]["tpr"], style, color=color, label=f"{m['backbone']} (AUC {auc})")
        if t["specificity"] is not None and t["sensitivity"] is not None:
            ax.plot([1 - t["specificity"]], [t["sensitivity"]], "o", color=color, ms=5)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", title="ROC on test (dots: chosen thresholds)",
           xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    ax.legend(loc="lower right", fontsize=8)
    out["roc"] = _png(fig, dpi, "ROC curves of all models on the test split")
    for m in results["models"]:
        h = m["train"]["history"]
        if h:
            fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(12, 3.2), gridspec_kw={"width_ratios": [1, 1, 0.8]})
            ep = [r["epoch"] for r in h]
            a1.plot(ep, [r["train_loss"] for r in h], "o-", label="train loss")
            a1.plot(ep, [r["val_loss"] for r in h], "o-", label="validation loss")
            a1.set(xlabel="epoch", title="loss")
            a1.legend(fontsize=8)
            a2.plot(ep, [r["val_auc"] for r in h], "o-", color="C2")
            a2.axvline(m["train"]["best_epoch"], color="k", ls=":", lw=1)
            a2.set(xlabel="epoch", title="validation AUC (dotted: chosen epoch)")
            for ax in (a1, a2):
                ax.xaxis.get_major_locator().set_params(integer=True)
        else:  # the ensemble: no training of its own
            fig, a3 = plt.subplots(figsize=(4, 3.2))
        ConfusionMatrixDisplay(np.array(m["test"]["confusion_matrix"]), display_labels=m["test"]["labels"]).plot(
            ax=a3, colorbar=False, cmap="Blues")
        a3.set_title(f"test confusion matrix (threshold {m['threshold']:.3f})")
        out[m["backbone"]] = _png(fig, dpi, f"{m['backbone']}: training curves and test confusion matrix")
    return out


THUMB_PX = 96


def thumbnails(model: dict, images: dict | None) -> str:
    """The model's most confident test errors as small inline PNGs, with file, truth and probability."""
    from PIL import Image

    if not images or "predictions" not in model:
        return ""
    cells = []
    class_names = model["test"]["labels"]
    for r in confident_errors(model):
        img = images.get(r["file"])
        if img is None:
            continue
        buf = io.BytesIO()
        Image.fromarray(np.asarray(img).reshape(img.shape[-2:])).resize((THUMB_PX, THUMB_PX)).save(buf, format="PNG")
        src = base64.b64encode(buf.getvalue()).decode()
        kind = "false positive" if r["label"] == 0 else "false negative"
        caption = (f"{kind}: true {class_names[r['label']]}, P({class_names[1]}) = {r['prob']:.3f}"
                   f"<br>{html.escape(r['file'])}")
        cells.append(f'<figure><img alt="{html.escape(kind)}" src="data:image/png;base64,{src}">'
                     f"<figcaption>{caption}</figcaption></figure>")
    return '<div class="thumbs">' + "".join(cells) + "</div>" if cells else "<p>No test errors.</p>"


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em 2em;max-width:1280px;color:#222}
h1{margin:.2em 0 .4em}h2{margin-top:1.5em}
table{border-collapse:collapse;margin:.6em 0;font-size:14px}
td,th{border:1px solid #ccc;padding:4px 7px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child,td:nth-child(2),td:nth-child(3),th:nth-child(3){text-align:left}
tr.seed{color:#777;font-style:italic}tr.best{background:#e3f2e3;font-weight:600}
.note{background:#fff6d6;padding:.5em 1em;border-left:4px solid #e0b000}
.winner{background:#e3f2e3;padding:.5em 1em;border-left:4px solid #2e8b2e}.small{font-size:13px;color:#555}
.thumbs{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;width:170px;font-size:11px;color:#444;overflow-wrap:anywhere}
figure img{width:96px;height:96px;image-rendering:pixelated;display:block}
img{max-width:100%}"""


def _html_table(header: list[str], rows: list[list[str]], best: str | None = None, seed: bool = False) -> str:
    e = html.escape
    body = "".join(f'<tr class="{"best" if r[0] == best else ""}">' + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    if seed:
        body += '<tr class="seed">' + "".join(f"<td>{e(c)}</td>" for c in seed_row()) + "</tr>"
    return "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + f"</tr>{body}</table>"


def _html(results: dict, figs: dict[str, str], thumbs: str = "") -> str:
    e = html.escape
    best = results["best"]["backbone"] if results["best"] else None
    synthetic = results["dataset"].get("synthetic")
    best_line = (f'<p class="winner"><b>Best model: {e(best)}</b> (green row) — rule: {e(results["best"]["rule"])}.</p>'
                 if best else "<p>No models.</p>")
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<title>Pneumonia classifier comparison</title>",
        f"<style>{CSS}</style></head><body><h1>Pneumonia classifier comparison</h1>",
        '<p class="note">SYNTHETIC DATA: these numbers mean nothing.</p>' if synthetic else "",
        best_line, _html_table(HEADER, table_rows(results), best, seed=True),
        f'<p class="small">{e(_ci_note(results))} Grey row: the AIMI Lab1 seed\'s {e(SEED_NOTE)} — '
        "a reference, not comparable.</p>",
        f'<p class="note">{e(undefined_note(results))}</p>' if undefined_note(results) else "",
        '<p class="small">' + re.sub(r"`([^`]*)`", r"<code>\1</code>", e(_dataset_line(results))) + "</p>",
        "<h2>Operating points (thresholds chosen on validation)</h2>",
        _html_table(OP_HEADER, operating_point_rows(results)), f'<p class="small">{e(SHIFT_NOTE)}</p>',
    ]
    if any(m.get("external") for m in results["models"]):
        parts += ["<h2>External data</h2>", _html_table(HEADER, table_rows(results, "external")),
                  f'<p class="small">{e(_ci_note(results, "external"))}</p>',
                  _html_table(EXTERNAL_OP_HEADER, operating_point_rows(results, "external"))]
    parts += ["<h2>ROC curves (test)</h2>", figs["roc"]]
    if thumbs:
        parts += [f"<h2>Most confident test errors of {e(best)}</h2>", thumbs]
    parts.append("<h2>Per model: training curves and confusion matrix</h2>")
    parts += [f"<h3>{e(m['backbone'])}</h3>{figs[m['backbone']]}" for m in results["models"]]
    parts.append("</body></html>")
    return "\n".join(parts)


def html_report(results: dict, max_bytes: int = MAX_HTML_BYTES, images: dict | None = None) -> str:
    """The self-contained HTML page (no external URL); figures shrink until it fits ``max_bytes``.

    ``images``: {test file: uint8 image} for the thumbnails of the best model's most confident errors.
    """
    best = next((m for m in results["models"] if results["best"] and m["backbone"] == results["best"]["backbone"]),
                None)
    thumbs = thumbnails(best, images) if best else ""
    for dpi in DPIS:
        page = _html(results, figures(results, dpi), thumbs)
        if len(page.encode()) <= max_bytes:
            return page
    log.warning("report.html is %d bytes even at %d dpi (limit %d)", len(page.encode()), dpi, max_bytes)
    return page


def render(full: dict, images: dict | None = None) -> tuple[dict, str, str, str]:
    """(results.json content, Markdown, HTML, predictions CSV) of the run's results (evaluation.combine's,
    with the per-image predictions).

    ``images``: {test file: uint8 image} for the thumbnails of the most confident errors.
    """
    results = without_predictions(full)
    return results, markdown(results), html_report(full, images=images), predictions_csv(full)


# the KFP UI's scalars of a model: its split figures (and their 95 % CI bounds) under these names
UI_SCALARS = ("accuracy", "precision", "sensitivity", "specificity", "f1", "auc")
UI_CI_SCALARS = ("accuracy", "f1", "auc", "sensitivity", "specificity")


def ui_scalars(r: dict) -> dict[str, float]:
    """The Metrics artifact's scalars for one model (finite numbers only: the UI's metadata is a
    protobuf Struct, which has no NaN; an undefined AUC is left out rather than faked)."""
    out = {}
    for split in ("test", "external"):
        t = r.get(split)
        if not t:
            continue
        out.update({f"{split}_{name}": t[name] for name in UI_SCALARS})
        for name in UI_CI_SCALARS:
            lo_hi = t["ci95"].get(name)  # none for a figure the data leaves undefined
            if lo_hi:
                out[f"{split}_{name}_ci95_low"], out[f"{split}_{name}_ci95_high"] = lo_hi
        out[f"{split}_n"] = t["n"]
    out.update({
        "val_auc": r["val"]["auc"], "val_f1": r["val"]["f1"], "threshold": r["threshold"],
        "best_epoch": r["train"]["best_epoch"], "train_seconds": r["train"]["seconds"],
        "train_images_per_second": r["train"]["images_per_second"], "parameters": r["parameters"],
    })
    return {k: (v if isinstance(v, int) else round(float(v), 6)) for k, v in out.items()
            if v is not None and math.isfinite(v)}


def log_ui_metrics(doc: dict, metrics, classification) -> None:
    """Fill a KFP ``Metrics`` and ``ClassificationMetrics`` artifact (passed in; this library never
    imports kfp) from one result document: scalars, test confusion matrix and test ROC."""
    for name, value in ui_scalars(doc).items():
        metrics.log_metric(name, value)
    classification.log_confusion_matrix(doc["test"]["labels"], doc["test"]["confusion_matrix"])
    roc = doc["roc"]
    if roc["fpr"] and all(math.isfinite(v) for v in roc["fpr"] + roc["tpr"]):  # none on a one-class split
        classification.log_roc_curve(roc["fpr"], roc["tpr"], roc["thresholds"])


OUTPUT_FILES = {"results": "results.json", "markdown": "report.md", "html": "report.html",
                "predictions": "predictions.csv"}


def write_outputs(out, results: dict, md: str, page: str, csv: str) -> None:
    """OUT/results.json, report.md, report.html and predictions.csv, all or none: each is written under a
    temporary name and renamed only once all four are complete (a full disk leaves the previous ones)."""
    from pathlib import Path

    from pneumonia_kfp.outputs import OutputError, document, write_error, write_files

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(out, e) from e
    if not out.is_dir():
        raise OutputError(f"cannot write into {out}: it is not a directory; choose another output folder")
    texts = {"results": document(results), "markdown": md, "html": page, "predictions": csv}
    write_files({out / OUTPUT_FILES[key]: text for key, text in texts.items()})


def render_from_store(full: dict) -> tuple[dict, str, str, str]:
    """``render`` with the error thumbnails' images read from the dataset version in the store."""
    from pneumonia_kfp.data import StoredDataset

    x, _, entries = StoredDataset(full["dataset"]["uri"]).split("test")
    return render(full, images={e["path"]: x[i] for i, e in enumerate(entries)})
