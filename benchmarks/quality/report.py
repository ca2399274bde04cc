# SPDX-License-Identifier: Apache-2.0
"""Markdown table and rate-distortion plot from the harness's result rows."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

__all__ = ["markdown_table", "rate_distortion_plot", "target_check", "rdr_check"]

ADA_GROUP = "sphkv-b+sink"          # the tuned ADA curve the targets are checked on
BASELINE_GROUPS = ("kivi", "turbo", "polarquant", "streamingllm", "snapkv", "pyramidkv", "h2o")

_COLS = [("model", "{}"), ("corpus", "{}"), ("method", "{}"), ("context", "{}"), ("bits_per_element", "{:.3f}"),
         ("bits_per_visible_element", "{:.3f}"),
         ("nll", "{:.4f}"), ("nll_delta_pct", "{:+.2f}"), ("retrieval_rate", "{:.3f}"), ("needle_hit_rate", "{:.3f}"),
         ("answer_nll", "{:.2f}"),
         ("logit_rel_err", "{:.4f}"), ("kl", "{:.4f}"), ("budget_fraction", "{}")]


def _fmt(fmt: str, v) -> str:
    return "–" if v is None else fmt.format(v)


def markdown_table(rows: list[dict]) -> str:
    """One line per (model, corpus, method, context), sorted by model, corpus, context, then bits."""
    head = "| " + " | ".join(c for c, _ in _COLS) + " |\n|" + "---|" * len(_COLS) + "\n"
    key = lambda r: (r.get("model", ""), r.get("corpus", ""), r["context"], -r["bits_per_element"], r["method"])  # noqa: E731
    body = "".join("| " + " | ".join(_fmt(f, r.get(c)) for c, f in _COLS) + " |\n" for r in sorted(rows, key=key))
    return head + body


def rate_distortion_plot(rows: list[dict], path: str | Path) -> None:
    """NLL change (%) vs bits per element, one curve per method group and context (symlog y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r.get("model", "smollm2"), r.get("corpus", "essays"), r["context"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 6), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for ax, (model, corpus, ctx) in zip(axes[0], panels):
        curves = defaultdict(list)
        for r in rows:
            if (r.get("model", "smollm2"), r.get("corpus", "essays"), r["context"]) == (model, corpus, ctx) \
                    and r["method"] != "full":
                curves[r.get("group", r["method"])].append((r["bits_per_element"], r["nll_delta_pct"], r["method"]))
        for i, (name, pts) in enumerate(sorted(curves.items())):
            pts.sort()
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            c = colors[i % len(colors)]
            if "variants" in name:                  # not a curve: one point per variant, labelled
                ax.scatter(xs, ys, marker="x", color=c, label=name, zorder=3)
                for x, y, m in pts:
                    ax.annotate(m, (x, y), fontsize=6, color=c, xytext=(3, 3), textcoords="offset points")
                continue
            if len(pts) == 1 or "@" in pts[0][2]:   # single points (budgeted methods): marker + label
                ax.scatter(xs, ys, marker="o" if "rdr" in name else "s", color=c, label=name, zorder=3,
                           s=60 if "rdr" in name else 30)
                for x, y, m in pts:
                    ax.annotate(m, (x, y), fontsize=6, color=c, xytext=(3, 3), textcoords="offset points")
                continue
            style = "-o" if name.startswith("sphkv") else "--s"
            ax.plot(xs, ys, style, color=c, label=name, ms=4, lw=2.5 if name == ADA_GROUP else 1.2)
        ax.axhline(1.0, color="grey", lw=0.6, ls=":")
        ax.axhline(3.0, color="grey", lw=0.6, ls=":")
        ax.set_yscale("symlog", linthresh=0.5)
        ax.set_xlabel("bits per element (K+V, all metadata)")
        ax.set_ylabel("NLL change vs full bf16 cache (%)")
        ax.set_title(f"{model}, {corpus}, context {ctx}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _interp(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of sorted ``(bits, value)`` points at ``x`` (None outside their range)."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[0][1] if len(points) == 1 and points[0][0] == x else None


def cap_bits(row: dict) -> float:
    """The bits a row's preset is capped on: ``bits_per_visible_element`` where the row has it (window-only presets:
    bytes over the elements the model's own full cache holds), else ``bits_per_element``."""
    return row.get("bits_per_visible_element", row["bits_per_element"])


def target_check(rows: list[dict], group: str = ADA_GROUP) -> str:
    """The issue's targets, checked on the ``group`` ADA curve, as markdown lines (pass/fail with numbers); a row's
    bits are :func:`cap_bits` (per visible element for window-only rows)."""
    out = [f"Targets, checked on the `{group}` rows:\n"]
    for mod, corpus, ctx in sorted({(r.get("model", ""), r.get("corpus", ""), r["context"]) for r in rows}):
        rs = [r for r in rows if (r.get("model", ""), r.get("corpus", ""), r["context"]) == (mod, corpus, ctx)]
        ctx = f"{mod}/{corpus}/{ctx}"
        full = next((r for r in rs if r["method"] == "full"), None)
        ada = sorted((r for r in rs if r.get("group") == group), key=cap_bits)
        if full is None or not ada:
            continue
        for limit, tol, needle in ((4.5, 1.0, True), (3.0, 3.0, False)):
            ok = [r for r in ada if cap_bits(r) <= limit]
            best = min(ok, key=lambda r: r["nll_delta_pct"], default=None)
            if best is None:
                out.append(f"- {ctx}: no ADA row at <= {limit} bits\n")
                continue
            passed = best["nll_delta_pct"] <= tol and (not needle or best["needle_hit_rate"] >= full["needle_hit_rate"])
            extra = f", needle {best['needle_hit_rate']:.2f} vs full {full['needle_hit_rate']:.2f}" if needle else ""
            out.append(f"- {ctx}, <= {limit} bits: {'PASS' if passed else 'MISS'} — {best['method']} "
                       f"{cap_bits(best):.3f} b/{'visible ' if 'bits_per_visible_element' in best else ''}elem, "
                       f"NLL {best['nll_delta_pct']:+.2f}% (target <= +{tol}%){extra}\n")
        pts = [(r["bits_per_element"], r["nll_delta_pct"]) for r in ada]
        for r in sorted(rs, key=lambda r: r["bits_per_element"]):
            if r.get("group") not in BASELINE_GROUPS or not 2.0 <= r["bits_per_element"] <= 5.0:
                continue
            a, how = _interp(pts, r["bits_per_element"]), "interpolated"
            if a is None:                           # outside the curve: the best ADA row with fewer bits
                fewer = [p for p in pts if p[0] <= r["bits_per_element"]]
                a, how = (min(fewer, key=lambda p: p[1])[1], "at fewer bits") if fewer else (None, "none")
            verdict = ("no ADA point at or below these bits" if a is None
                       else "ADA lower" if a < r["nll_delta_pct"] else "ADA NOT lower")
            a_txt = "–" if a is None else f"{a:+.2f}%"
            out.append(f"- {ctx}, matched {r['bits_per_element']:.3f} b/elem: {r['method']} {r['nll_delta_pct']:+.2f}% "
                       f"vs ADA ({how}) {a_txt}: {verdict}\n")
    return "".join(out)


EVICTION = ("streamingllm", "snapkv", "pyramidkv", "h2o")


def rdr_check(rows: list[dict]) -> str:
    """Issue 13's done-when, per (model, corpus, context), as markdown lines with the numbers.

    * ``ada+rdr@0.25``: NLL ≤ ``sphkv-4b+sink``'s + 0.1 percentage point, retrieval ≥ its.
    * ``ada+rdr@0.10``: NLL within +2 %, no worse (NLL) than any eviction baseline at 0.10, retrieval ≥
      half of full's (stretch: equal).
    """
    out = ["RDR checks (issue 13 done-when):\n"]
    for mod, corpus, ctx in sorted({(r.get("model", ""), r.get("corpus", ""), r["context"]) for r in rows}):
        rs = {r["method"]: r for r in rows
              if (r.get("model", ""), r.get("corpus", ""), r["context"]) == (mod, corpus, ctx)}
        tag = f"{mod}/{corpus}/{ctx}"
        full, uni, r25, r10 = (rs.get(k) for k in ("full", "sphkv-4b+sink", "ada+rdr@0.25", "ada+rdr@0.10"))
        if r25 and uni:
            ok_nll = r25["nll_delta_pct"] <= uni["nll_delta_pct"] + 0.1
            ok_ret = r25["retrieval_rate"] >= uni["retrieval_rate"]
            out.append(f"- {tag} ada+rdr@0.25: {'PASS' if ok_nll and ok_ret else 'MISS'} — NLL "
                       f"{r25['nll_delta_pct']:+.2f}% vs sphkv-4b+sink {uni['nll_delta_pct']:+.2f}% (+0.1 pp allowed), "
                       f"retrieval {r25['retrieval_rate']:.3f} vs {uni['retrieval_rate']:.3f}\n")
        if r10 and full:
            ev = [rs[f"{p}@0.10"] for p in EVICTION if f"{p}@0.10" in rs]
            best = min(ev, key=lambda r: r["nll_delta_pct"], default=None)
            ok_nll = r10["nll_delta_pct"] <= 2.0
            ok_ev = best is None or r10["nll_delta_pct"] <= best["nll_delta_pct"]
            ok_ret = r10["retrieval_rate"] >= 0.5 * full["retrieval_rate"]
            best_txt = f"best eviction {best['method']} {best['nll_delta_pct']:+.2f}%" if best else "no eviction rows"
            out.append(f"- {tag} ada+rdr@0.10: {'PASS' if ok_nll and ok_ev and ok_ret else 'MISS'} — NLL "
                       f"{r10['nll_delta_pct']:+.2f}% (<= +2%: {'yes' if ok_nll else 'no'}; {best_txt}: "
                       f"{'no worse' if ok_ev else 'WORSE'}), retrieval {r10['retrieval_rate']:.3f} vs full "
                       f"{full['retrieval_rate']:.3f} (>= half: {'yes' if ok_ret else 'no'}; "
                       f"equal: {'yes' if r10['retrieval_rate'] >= full['retrieval_rate'] else 'no'})\n")
    return "".join(out)


SUMMARY_METHODS = ("full", "sphkv-4b+sink", "ada+rdr@0.25", "ada+rdr@0.10", "h2o@0.10", "snapkv@0.10",
                   "streamingllm@0.10", "pyramidkv@0.10")


def summary_table(rows: list[dict]) -> str:
    """README table: per method, NLL change and retrieval (hits of 24) for every (model, corpus, context)."""
    cols = sorted({(r.get("model", ""), r.get("corpus", ""), r["context"]) for r in rows})
    by = {(r.get("model", ""), r.get("corpus", ""), r["context"], r["method"]): r for r in rows}
    head = "| method | bits/elem | " + " | ".join(f"{c} {n // 1024}K" for _, c, n in cols) + " |\n"
    head += "|---|---|" + "---|" * len(cols) + "\n"
    body = ""
    for m in SUMMARY_METHODS:
        rs = [by.get((*c, m)) for c in cols]
        if not any(rs):
            continue
        bits = sorted({f"{r['bits_per_element']:.2f}" for r in rs if r})
        cells = ["–" if r is None else f"{r['nll_delta_pct']:+.2f}%, {round(r['retrieval_rate'] * r['retrieval_cases'])}/"
                 f"{r['retrieval_cases']}" for r in rs]
        body += f"| {m} | {' / '.join(bits)} | " + " | ".join(cells) + " |\n"
    return head + body
