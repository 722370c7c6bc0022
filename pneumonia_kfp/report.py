"""report: every backbone's results side by side, as results.json, Markdown and self-contained HTML."""

import base64
import html
import io
import logging
import re

log = logging.getLogger(__name__)

BEST_RULE = "highest validation AUC (ties: higher validation F1); test metrics play no part in the choice"
# The AIMI Lab1 seed's published figures, for reference only: its best epoch was picked on test.
SEED_REFERENCE = {"backbone": "resnext50_32x4d (seed, AIMI Lab1)", "accuracy": 0.9439, "f1": 0.9556}


def best_model(models: list[dict]) -> dict:
    return max(models, key=lambda m: (m["val"]["auc"], m["val"]["f1"]))


def combine(dataset: dict, models: list[dict]) -> dict:
    """results.json: the dataset and every model, sorted by backbone name."""
    models = sorted(models, key=lambda m: m["backbone"])
    return {"dataset": dataset, "models": models,
            "best": {"backbone": best_model(models)["backbone"], "rule": BEST_RULE} if models else None}


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _with_ci(block: dict, key: str, pct: bool = True, ci_key: str | None = None) -> str:
    fmt = _pct if pct else (lambda v: f"{v:.4f}")
    ci = block.get("ci95", {}).get(ci_key or key)
    return f"{fmt(block[key])} ({fmt(ci[0])}–{fmt(ci[1])})" if ci else fmt(block[key])


def _count(n) -> str:
    return "–" if n is None else f"{n / 1e6:.1f} M"


def table_rows(results: dict) -> list[list[str]]:
    rows = []
    for m in results["models"]:
        t = m["test"]
        rows.append([
            m["backbone"], _count(m.get("parameters")),
            f"{m['image_size']} px, {m['epochs']} ep (best {m['train']['best_epoch']}), "
            f"{'pretrained' if m['pretrained'] else 'scratch'}, thr {m['threshold']:.3f}",
            _with_ci(t, "accuracy"), _with_ci(t, "f1", pct=False), _with_ci(t, "recall", ci_key="sensitivity"),
            _with_ci(t, "specificity"), _with_ci(t, "auc", pct=False), f"{m['val']['auc']:.4f}",
            f"{m['train']['seconds']:.0f} s", f"{m['train']['images_per_second']:.0f}",
        ])
    return rows


HEADER = ["backbone", "parameters", "settings", "accuracy % (95% CI)", "F1 (95% CI)", "sensitivity % (95% CI)",
          "specificity % (95% CI)", "AUC (95% CI)", "val AUC", "train time", "img/s"]
SEED_NOTE = "published figures; best epoch selected on test in the original"
CI_NOTE = ("Test split{n}. 95% CI: class-stratified bootstrap, 1,000 resamples (seeded). Decision threshold "
           "chosen on validation (Youden's J). Sensitivity = recall of {pos}, specificity = recall of {neg}.")


def seed_row(n_columns: int = len(HEADER)) -> list[str]:
    s = SEED_REFERENCE
    return [s["backbone"], "–", SEED_NOTE, _pct(s["accuracy"]), f"{s['f1']:.4f}"] + ["–"] * (n_columns - 5)


def _ci_note(results: dict) -> str:
    models = results["models"]
    labels = models[0]["test"]["labels"] if models else ["negative", "positive"]
    ns = sorted({m["test"]["n"] for m in models})
    return CI_NOTE.format(n=f" (n = {', '.join(map(str, ns))})" if ns else "", neg=labels[0], pos=labels[1])


def _dataset_line(d: dict) -> str:
    counts = ", ".join(f"{s}: " + " / ".join(f"{n} {c}" for c, n in cs.items())
                       for s, cs in d.get("counts", {}).items())
    from pneumonia_kfp.training import MIN_VAL_IMAGES

    carved = " Test split carved from train (grouped by patient)." if d.get("test_carved_from_train") else ""
    n_val = sum(d.get("counts", {}).get("val", {}).values())
    if n_val < MIN_VAL_IMAGES:
        carved += (f" Its val split has {n_val} images (< {MIN_VAL_IMAGES}): each model validated on a "
                   "patient-grouped carve-out of train + val instead (n in each model's val block).")
    return f"Dataset `{d.get('uri', '?')}` ({counts}).{carved}"


def markdown(results: dict) -> str:
    lines = ["# Pneumonia classifier comparison", ""]
    if results["dataset"].get("synthetic"):
        lines += ["> **SYNTHETIC DATA: these numbers mean nothing about real X-rays.**", ""]
    lines += [_dataset_line(results["dataset"]), ""]
    lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(results)]
    lines.append("| " + " | ".join(seed_row()) + " |")
    lines += ["", _ci_note(results) + " The last row is the AIMI Lab1 seed's " + SEED_NOTE + ": not comparable."]
    if results["best"]:
        lines += ["", f"**Best model: {results['best']['backbone']}** — rule: {results['best']['rule']}."]
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
        ax.plot(m["roc"]["fpr"], m["roc"]["tpr"], color=f"C{i % 10}",
                label=f"{m['backbone']} (AUC {t['auc']:.3f})")
        ax.plot([1 - t["specificity"]], [t["recall"]], "o", color=f"C{i % 10}", ms=5)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", title="ROC on test (dots: chosen thresholds)",
           xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    ax.legend(loc="lower right", fontsize=8)
    out["roc"] = _png(fig, dpi, "ROC curves of all models on the test split")
    for m in results["models"]:
        fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(12, 3.2), gridspec_kw={"width_ratios": [1, 1, 0.8]})
        h = m["train"]["history"]
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
        ConfusionMatrixDisplay(np.array(m["test"]["confusion_matrix"]), display_labels=m["test"]["labels"]).plot(
            ax=a3, colorbar=False, cmap="Blues")
        a3.set_title(f"test confusion matrix (threshold {m['threshold']:.3f})")
        out[m["backbone"]] = _png(fig, dpi, f"{m['backbone']}: training curves and test confusion matrix")
    return out


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em 2em;max-width:1280px;color:#222}
h1{margin:.2em 0 .4em}h2{margin-top:1.5em}
table{border-collapse:collapse;margin:.6em 0;font-size:14px}
td,th{border:1px solid #ccc;padding:4px 7px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child,td:nth-child(3),th:nth-child(3){text-align:left}
tr.seed{color:#777;font-style:italic}tr.best{background:#e3f2e3;font-weight:600}
.note{background:#fff6d6;padding:.5em 1em;border-left:4px solid #e0b000}
.winner{background:#e3f2e3;padding:.5em 1em;border-left:4px solid #2e8b2e}.small{font-size:13px;color:#555}
img{max-width:100%}"""


def _html(results: dict, figs: dict[str, str]) -> str:
    e = html.escape
    best = results["best"]["backbone"] if results["best"] else None
    rows = "".join(
        f'<tr class="{"best" if r[0] == best else ""}">' + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>"
        for r in table_rows(results)
    )
    rows += '<tr class="seed">' + "".join(f"<td>{e(c)}</td>" for c in seed_row()) + "</tr>"
    synthetic = results["dataset"].get("synthetic")
    best_line = (f'<p class="winner"><b>Best model: {e(best)}</b> (green row) — rule: {e(BEST_RULE)}.</p>'
                 if best else "<p>No models.</p>")
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<title>Pneumonia classifier comparison</title>",
        f"<style>{CSS}</style></head><body><h1>Pneumonia classifier comparison</h1>",
        '<p class="note">SYNTHETIC DATA: these numbers mean nothing.</p>' if synthetic else "",
        best_line,
        "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in HEADER) + f"</tr>{rows}</table>",
        f'<p class="small">{e(_ci_note(results))} Grey row: the AIMI Lab1 seed\'s {e(SEED_NOTE)} — '
        "a reference, not comparable.</p>",
        '<p class="small">' + re.sub(r"`([^`]*)`", r"<code>\1</code>", e(_dataset_line(results["dataset"]))) + "</p>",
        "<h2>ROC curves (test)</h2>", figs["roc"],
        "<h2>Per model: training curves and confusion matrix</h2>",
    ]
    parts += [f"<h3>{e(m['backbone'])}</h3>{figs[m['backbone']]}" for m in results["models"]]
    parts.append("</body></html>")
    return "\n".join(parts)


def html_report(results: dict, max_bytes: int = MAX_HTML_BYTES) -> str:
    """The self-contained HTML page (no external URL); figures shrink until it fits ``max_bytes``."""
    for dpi in DPIS:
        page = _html(results, figures(results, dpi))
        if len(page.encode()) <= max_bytes:
            return page
    log.warning("report.html is %d bytes even at %d dpi (limit %d)", len(page.encode()), dpi, max_bytes)
    return page


def report(dataset: dict, models: list[dict]) -> tuple[dict, str, str]:
    """(results.json content, Markdown, HTML)."""
    results = combine(dataset, models)
    return results, markdown(results), html_report(results)
