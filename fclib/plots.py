"""What the notebooks show: training curves, evaluation charts, transcripts side by side."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

from IPython.display import HTML

TRAINING_PANELS = (
    ("loss", "loss"),
    ("rewards/margins", "reward margin (chosen - rejected)"),
    ("rewards/accuracies", "reward accuracy"),
    ("logps/chosen", "log p(chosen)"),
    ("logps/rejected", "log p(rejected)"),
)


def training_curves(log_history: Sequence[dict[str, Any]]) -> Any:
    """DPO curves over steps, train (dots) and validation (squares): loss, margins, accuracy, log-probs."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TRAINING_PANELS), figsize=(4 * len(TRAINING_PANELS), 3.2))
    for ax, (key, title) in zip(axes, TRAINING_PANELS):
        for prefix, label, marker in (("", "train", "o"), ("eval_", "validation", "s")):
            points = [(e["step"], e[prefix + key]) for e in log_history if prefix + key in e and "step" in e]
            if points:
                ax.plot(*zip(*points), marker=marker, markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    return fig


OUTCOME_COLORS = {
    "correct": "tab:green",
    "wrong_answer": "tab:red",
    "no_answer": "tab:orange",
    "invalid_call": "tab:purple",
    "max_steps": "tab:brown",
    "error": "black",
}


def accuracy_bars(metrics: dict[str, Any]) -> Any:
    """Accuracy per task, one bar per model, with 95% Wilson intervals."""
    import matplotlib.pyplot as plt

    models = list(metrics["models"])
    tasks = sorted({t for m in metrics["models"].values() for t in m})
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(tasks) * max(1, len(models)) / 2, 3.4))
    width = 0.8 / max(1, len(models))
    for j, label in enumerate(models):
        xs, ys, lo, hi = [], [], [], []
        for i, task in enumerate(tasks):
            m = metrics["models"][label].get(task)
            if m:
                xs.append(i + (j - (len(models) - 1) / 2) * width)
                ys.append(m["accuracy"])
                lo.append(m["accuracy"] - m["ci95"][0])
                hi.append(m["ci95"][1] - m["accuracy"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=label)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (verified), 95% CI")
    ax.set_title("Held-out accuracy per model")
    ax.legend()
    fig.tight_layout()
    return fig


def outcome_breakdown(metrics: dict[str, Any]) -> Any:
    """How each model's chains end, per task (shares of chains)."""
    import matplotlib.pyplot as plt

    rows = [
        (f"{label} / {task}", m["outcomes"], m["n"])
        for label, tasks in metrics["models"].items()
        for task, m in tasks.items()
    ]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    for y, (_name, outcomes, n) in enumerate(rows):
        left = 0.0
        for outcome, color in OUTCOME_COLORS.items():
            share = outcomes.get(outcome, 0) / n if n else 0
            ax.barh(y, share, left=left, color=color, label=outcome if y == 0 else None)
            left += share
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("share of chains")
    ax.set_title("How the chains end")
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    fig.tight_layout()
    return fig


def accuracy_by_size(metrics: dict[str, Any]) -> Any:
    """FOL accuracy against the number of individuals in the world, per model, with 95% CIs."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for label, tasks in metrics["models"].items():
        sizes = tasks.get("fol", {}).get("by_size", {})
        if sizes:
            xs = [int(s) for s in sizes]
            ys = [v["accuracy"] for v in sizes.values()]
            err = [
                [y - v["ci95"][0] for y, v in zip(ys, sizes.values())],
                [v["ci95"][1] - y for y, v in zip(ys, sizes.values())],
            ]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
    ax.set_xlabel("individuals in the world")
    ax.set_ylabel("FOL accuracy (verified)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("FOL accuracy by world size")
    ax.legend()
    fig.tight_layout()
    return fig


def side_by_side(*columns: tuple[str, str]) -> Any:
    """(title, transcript) columns side by side, as HTML for a notebook; all text escaped: model output is untrusted."""

    cells = "".join(
        "<td style='vertical-align:top;text-align:left'>"
        f"<b>{escape(title)}</b><pre style='white-space:pre-wrap;font-size:11px'>{escape(text)}</pre></td>"
        for title, text in columns
    )
    return HTML(f"<table><tr>{cells}</tr></table>")


def forest(rows: Sequence[dict[str, Any]], title: str = "DPO minus base, verified accuracy") -> Any:
    """A forest plot: one line per row (`label`, `difference`, `ci95`; `pooled: True` drawn as a diamond)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 0.9 + 0.42 * len(rows)))
    for y, row in enumerate(reversed(rows)):
        lo, hi = row["ci95"]
        d = row["difference"]
        if row.get("pooled"):
            ax.fill([lo, d, hi, d], [y, y + 0.25, y, y - 0.25], color="black")
        else:
            ax.plot([lo, hi], [y, y], color="tab:blue")
            ax.plot([d], [y], "s", color="tab:blue", markersize=5)
    ax.axvline(0, color="gray", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(rows)), [row["label"] for row in reversed(rows)])
    ax.set_xlabel("difference in verified accuracy (95% CI)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig
