"""report: every backbone's results side by side, as results.json, Markdown and self-contained HTML."""

import base64
import html
import io

from typing import List

from kfp import dsl

from components.kfp_defaults import component

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


def _with_ci(block: dict, key: str, pct: bool = True) -> str:
    fmt = _pct if pct else (lambda v: f"{v:.4f}")
    ci = block.get("ci95", {}).get(key)
    return f"{fmt(block[key])} ({fmt(ci[0])}–{fmt(ci[1])})" if ci else fmt(block[key])


def table_rows(results: dict) -> list[list[str]]:
    rows = []
    for m in results["models"]:
        t = m["test"]
        rows.append([
            m["backbone"], f"{m['image_size']} px, {m['epochs']} ep (best {m['train']['best_epoch']}), "
            f"{'pretrained' if m['pretrained'] else 'scratch'}, thr {m['threshold']:.3f}",
            _with_ci(t, "accuracy"), _with_ci(t, "f1", pct=False), _pct(t["recall"]), _pct(t["specificity"]),
            _with_ci(t, "auc", pct=False), f"{m['train']['seconds']:.0f} s", f"{m['train']['images_per_second']:.0f}",
        ])
    return rows


HEADER = ["backbone", "parameters", "accuracy % (95% CI)", "F1 (95% CI)", "sensitivity %", "specificity %",
          "AUC (95% CI)", "train time", "img/s"]


def _dataset_line(d: dict) -> str:
    counts = ", ".join(f"{s}: " + " / ".join(f"{n} {c}" for c, n in cs.items()) for s, cs in d.get("counts", {}).items())
    carved = " Test split carved from train (grouped by patient)." if d.get("test_carved_from_train") else ""
    return f"Dataset `{d.get('uri', '?')}` ({counts}).{carved}"


def markdown(results: dict) -> str:
    lines = ["# Pneumonia classifier comparison", "", _dataset_line(results["dataset"]), ""]
    lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(results)]
    s = SEED_REFERENCE
    lines.append(f"| {s['backbone']} | selected on test in the original | {_pct(s['accuracy'])} | {s['f1']:.4f} "
                 "| – | – | – | – | – |")
    if results["best"]:
        lines += ["", f"**Best model: {results['best']['backbone']}** — rule: {results['best']['rule']}."]
    lines += ["", "## Confusion matrices (test; rows true, columns predicted)", ""]
    for m in results["models"]:
        (tn, fp), (fn, tp) = m["test"]["confusion_matrix"]
        a, b = m["test"]["labels"]
        lines += [f"**{m['backbone']}**", "", f"| | pred {a} | pred {b} |", "|---|---|---|",
                  f"| true {a} | {tn} | {fp} |", f"| true {b} | {fn} | {tp} |", ""]
    return "\n".join(lines) + "\n"


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def figures(results: dict) -> dict[str, str]:
    """Inline PNGs: ROC curves overlaid, training curves and confusion matrix per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    out = {}
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for m in results["models"]:
        ax.plot(m["roc"]["fpr"], m["roc"]["tpr"], label=f"{m['backbone']} (AUC {m['test']['auc']:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", title="ROC on test")
    ax.legend(loc="lower right", fontsize=8)
    out["roc"] = _png(fig)
    for m in results["models"]:
        fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(12, 3.2))
        h = m["train"]["history"]
        ep = [r["epoch"] for r in h]
        a1.plot(ep, [r["train_loss"] for r in h], "o-", label="train loss")
        a1.plot(ep, [r["val_loss"] for r in h], "o-", label="val loss")
        a1.set(xlabel="epoch", title="loss")
        a1.legend(fontsize=8)
        a2.plot(ep, [r["val_auc"] for r in h], "o-", color="C2")
        a2.axvline(m["train"]["best_epoch"], color="k", ls=":", lw=1)
        a2.set(xlabel="epoch", title="validation AUC (dotted: chosen epoch)")
        ConfusionMatrixDisplay(
            __import__("numpy").array(m["test"]["confusion_matrix"]), display_labels=m["test"]["labels"]
        ).plot(ax=a3, colorbar=False, cmap="Blues")
        a3.set_title("test confusion matrix")
        fig.suptitle(m["backbone"])
        out[m["backbone"]] = _png(fig)
    return out


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}tr.seed{color:#777;font-style:italic}tr.best{background:#e8f4e8}
.note{background:#fff6d6;padding:.5em 1em;border-left:4px solid #e0b000}"""


def html_report(results: dict) -> str:
    e = html.escape
    figs = figures(results)
    best = results["best"]["backbone"] if results["best"] else None
    rows = "".join(
        f'<tr class="{"best" if r[0] == best else ""}">' + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>"
        for r in table_rows(results)
    )
    s = SEED_REFERENCE
    rows += (f'<tr class="seed"><td>{e(s["backbone"])}</td><td>selected on test in the original</td>'
             f"<td>{_pct(s['accuracy'])}</td><td>{s['f1']:.4f}</td>" + "<td>–</td>" * 5 + "</tr>")
    synthetic = results["dataset"].get("synthetic")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Pneumonia classifier comparison</title>",
        f"<style>{CSS}</style></head><body><h1>Pneumonia classifier comparison</h1>",
        '<p class="note">SYNTHETIC DATA: these numbers mean nothing.</p>' if synthetic else "",
        f"<p>{e(_dataset_line(results['dataset']))}</p>",
        f"<p><b>Best model: {e(best or '–')}</b> — rule: {e(BEST_RULE)}.</p>",
        "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in HEADER) + f"</tr>{rows}</table>",
        "<h2>ROC curves (test)</h2>", figs["roc"], "<h2>Per model</h2>",
    ]
    parts += [f"<h3>{e(m['backbone'])}</h3>{figs[m['backbone']]}" for m in results["models"]]
    parts.append("</body></html>")
    return "\n".join(parts)


def report(dataset: dict, models: list[dict]) -> tuple[dict, str, str]:
    """(results.json content, Markdown, HTML)."""
    results = combine(dataset, models)
    return results, markdown(results), html_report(results)


@component()
def report_op(
    dataset: dsl.Input[dsl.Dataset], results: dsl.Input[List[dsl.Artifact]], markdown: dsl.Output[dsl.Markdown],
    html: dsl.Output[dsl.HTML], summary: dsl.Output[dsl.Artifact],
):
    """Compare every backbone: Markdown and HTML for the UI, and the combined results.json."""
    import json

    from components.report import report

    models = []
    for artifact in results:
        with open(artifact.path) as f:
            models.append(json.load(f))
    with open(dataset.path) as f:
        info = json.load(f)  # the file keeps ints; KFP metadata turns numbers into floats
    combined, md, page = report(info, models)
    for artifact, text in ((markdown, md), (html, page), (summary, json.dumps(combined, indent=1))):
        with open(artifact.path, "w") as f:
            f.write(text)
    summary.metadata["best"] = combined["best"]["backbone"]
