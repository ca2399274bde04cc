# SPDX-License-Identifier: Apache-2.0
"""Markdown table and rate-distortion plot from the harness's result rows."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

__all__ = ["markdown_table", "rate_distortion_plot"]

_COLS = [("method", "{}"), ("context", "{}"), ("bits_per_element", "{:.3f}"), ("nll", "{:.4f}"),
         ("nll_delta_pct", "{:+.2f}"), ("needle_hit_rate", "{:.2f}"), ("answer_nll", "{:.2f}"),
         ("logit_rel_err", "{:.4f}"), ("kl", "{:.4f}"), ("budget_fraction", "{}")]


def _fmt(fmt: str, v) -> str:
    return "–" if v is None else fmt.format(v)


def markdown_table(rows: list[dict]) -> str:
    """One line per (method, context), sorted by context then bits."""
    head = "| " + " | ".join(c for c, _ in _COLS) + " |\n|" + "---|" * len(_COLS) + "\n"
    body = "".join("| " + " | ".join(_fmt(f, r.get(c)) for c, f in _COLS) + " |\n"
                   for r in sorted(rows, key=lambda r: (r["context"], -r["bits_per_element"], r["method"])))
    return head + body


def rate_distortion_plot(rows: list[dict], path: str | Path) -> None:
    """NLL change (%) vs bits per element, one curve per method group and context (symlog y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(1, len(contexts), figsize=(6.5 * len(contexts), 5), squeeze=False)
    for ax, ctx in zip(axes[0], contexts):
        curves = defaultdict(list)
        for r in rows:
            if r["context"] == ctx and r["method"] != "full":
                curves[r.get("group", r["method"])].append((r["bits_per_element"], r["nll_delta_pct"]))
        for name, pts in sorted(curves.items()):
            pts.sort()
            style = "-o" if name.startswith("sphkv") else "--s"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name, ms=4)
        ax.axhline(1.0, color="grey", lw=0.6, ls=":")
        ax.axhline(3.0, color="grey", lw=0.6, ls=":")
        ax.set_yscale("symlog", linthresh=0.5)
        ax.set_xlabel("bits per element (K+V, all metadata)")
        ax.set_ylabel("NLL change vs full bf16 cache (%)")
        ax.set_title(f"SmolLM2-135M, essays, context {ctx}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
