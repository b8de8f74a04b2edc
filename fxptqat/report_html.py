"""The sensitivity report a person opens: one self-contained HTML file (and PNG plots) per analysis.

Per node in graph order: isolated and propagated MSE / SQNR / cosine, the error growth between them
(SQNR lost downstream of the node), QAT or frozen under the policy and why, parity after lowering,
and task-level sensitivity when measured. Plots are embedded as base64 PNGs; the sort script and the
styles are inline: the file opens offline, and no external URL is referenced.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math

from .errors import ConfigError
from .stats import badness

__all__ = ["plots", "render_html", "why"]

_STYLE = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1b1b1b;max-width:1400px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px} .muted{color:#666}
.cards{display:flex;gap:12px;flex-wrap:wrap} .card{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:150px}
.card b{display:block;font-size:18px} table{border-collapse:collapse;font-size:13px;width:100%}
th,td{border-bottom:1px solid #e4e4e4;padding:4px 6px;text-align:right;white-space:nowrap}
th{cursor:pointer;background:#f6f6f6;position:sticky;top:0} th:hover{background:#ececec}
td.l,th.l{text-align:left} tr.frozen td{background:#fff6e5} tr.qat td{background:#eef8ee}
.bad{color:#b00020;font-weight:600} .ok{color:#1a7f37} img{max-width:100%;border:1px solid #eee;margin:6px 0}
.plots{display:grid;grid-template-columns:1fr;gap:12px} code{background:#f3f3f3;padding:1px 4px}
"""
# Click a header to sort by it (numbers numerically, by data-v); click again to reverse.
_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var body = th.closest('table').tBodies[0], rows = Array.from(body.rows);
    var dir = th.dataset.dir === 'asc' ? -1 : 1; th.dataset.dir = dir === 1 ? 'asc' : 'desc';
    rows.sort(function(a, b){
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      var nx = parseFloat(x), ny = parseFloat(y);
      if (!isNaN(nx) && !isNaN(ny)) return dir * (nx - ny);
      return dir * String(x).localeCompare(String(y));
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
"""


def why(row, selection, policy) -> str:
    """Why the policy trained or froze this node, in the policy's own terms."""
    if selection is None:
        return ""
    trained = row.name in selection.trainable
    metric, mode = getattr(policy, "metric", None), getattr(policy, "mode", None)
    theta = getattr(policy, "theta", None)
    theta = selection.theta if not isinstance(theta, (int, float)) else theta
    if metric is None or mode is None:
        return f"{'trained' if trained else 'frozen'} by {selection.policy}"
    value = badness(row.stats(mode), metric)
    shown = -value if metric == "sqnr_db" else value
    label = f"{mode} {'1 - cosine' if metric == 'cosine' else metric} {shown:.3g}"
    if theta is None:
        return f"{label}: {'trained' if trained else 'frozen'} ({selection.policy})"
    bound = -theta if metric == "sqnr_db" else theta
    side = "<" if value < bound else ">="
    shown_theta = theta if metric != "sqnr_db" else f"{theta} dB"
    return f"{label} {side if metric != 'sqnr_db' else ('>' if side == '<' else '<=')} θ={shown_theta}"


def _growth_db(row) -> float:
    """SQNR lost between the node's own (isolated) error and what the network carries (propagated)."""
    iso, prop = row.isolated.sqnr_db, row.propagated.sqnr_db
    return iso - prop if math.isfinite(iso) and math.isfinite(prop) else float("nan")


def plots(report, *, selection=None, parity=None, sensitivity=None, policy=None) -> dict[str, bytes]:
    """PNG images (name -> bytes): error per node, SQNR per node, error growth, parity and
    sensitivity when given. Needs matplotlib (``pip install fxptqat[plots]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError(f"plots need matplotlib ({e}); install it with `pip install fxptqat[plots]`.") from e
    names = [r.name for r in report.rows]
    x = range(len(names))
    trained = set(selection.trainable) if selection is not None else set()
    out = {}

    def figure(title, ylabel, draw, log=False):
        fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(names) + 2), 3.6), dpi=110)
        draw(ax)
        ax.set_title(title, fontsize=11)
        ax.set_ylabel(ylabel)
        ax.set_xticks(list(x), names, rotation=70, ha="right", fontsize=7)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        return buf.getvalue()

    def mse(ax):
        ax.plot(x, [max(r.isolated.mse, 1e-30) for r in report.rows], "o-", label="isolated (float inputs)")
        ax.plot(x, [max(r.propagated.mse, 1e-30) for r in report.rows], "s-", label="propagated (quantized network)")
        if trained:
            ax.scatter([i for i, n in enumerate(names) if n in trained],
                       [max(report.rows[i].isolated.mse, 1e-30) for i, n in enumerate(names) if n in trained],
                       s=90, facecolors="none", edgecolors="green", label="QAT under the policy")
        theta = getattr(policy, "theta", None)
        theta = theta if isinstance(theta, (int, float)) else getattr(selection, "theta", None)
        if theta and getattr(policy, "metric", "mse") == "mse":
            ax.axhline(theta, color="gray", ls="--", lw=1, label=f"θ={theta:.3g}")
    out["error_mse.png"] = figure("MSE per node, in graph order", "MSE", mse, log=True)

    def sqnr(ax):
        ax.plot(x, [r.isolated.sqnr_db for r in report.rows], "o-", label="isolated")
        ax.plot(x, [r.propagated.sqnr_db for r in report.rows], "s-", label="propagated")
    out["error_sqnr.png"] = figure("SQNR per node (higher is better)", "SQNR dB", sqnr)

    def growth(ax):
        values = [_growth_db(r) for r in report.rows]
        ax.bar(x, [0 if math.isnan(v) else v for v in values], color=["#d9822b" if v > 0 else "#4c9be8" for v in values])
    out["error_growth.png"] = figure("Error growth: SQNR lost downstream (isolated - propagated)", "dB", growth)

    if parity is not None and parity.rows:
        def par(ax):
            steps = {r.name: r.lsb(r.isolated_max_abs) for r in parity.rows}
            ax.bar(x, [steps.get(n) or 0 for n in names], color="#4c9be8", label="isolated max |diff| (output steps)")
            ax.axhline(1.0, color="red", ls="--", lw=1, label="tolerance: 1 step")
        out["parity.png"] = figure("Parity after lowering: INT8 vs fake-quant per node", "steps", par)
    if sensitivity:
        def sens(ax):
            ax.bar([i - 0.2 for i in x], [sensitivity.get(n, {}).get("only", 0) for n in names], 0.4,
                   label="score drop, only this node quantized")
            ax.bar([i + 0.2 for i in x], [sensitivity.get(n, {}).get("all_but", 0) for n in names], 0.4,
                   label="score gain, all but this node quantized")
        out["sensitivity.png"] = figure("Task-level sensitivity per node", "score", sens)
    return out


def _num(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '<td data-v="">-</td>'
    return f'<td data-v="{value!r}">{format(value, fmt)}</td>'


def render_html(report, *, selection=None, policy=None, parity=None, sensitivity=None,
                config=None, timings=None, title: str = "fxptqat sensitivity report", images=None) -> str:
    """The whole report as one HTML string; ``images`` (from :func:`plots`) are embedded."""
    rows = report.rows
    parity_rows = {r.name: r for r in parity.rows} if parity is not None else {}
    trained = set(selection.trainable) if selection is not None else set()
    e = html.escape
    worst_iso = sorted(rows, key=lambda r: -r.isolated.mse)[:3]
    worst_growth = sorted((r for r in rows if not math.isnan(_growth_db(r))), key=lambda r: -_growth_db(r))[:3]
    cards = [("weighted nodes", str(len(rows))), ("batches / samples", f"{report.batches} / {report.samples}")]
    if selection is not None:
        cards += [("QAT / frozen", f"{len(selection.trainable)} / {len(selection.frozen)}"),
                  ("trainable parameters", f"{selection.trainable_params:,} of {selection.total_params:,} "
                                           f"({selection.trainable_fraction:.1%})")]
    if parity is not None:
        cards.append(("parity", f"{'ok' if parity.ok else 'DIVERGES'}, coverage {parity.coverage:.0%}"))
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{e(title)}</h1>",
             f"<div class='muted'>graph {e(report.graph_id[:12])}"
             + (f"; policy <code>{e(selection.policy)}</code>" if selection is not None else "") + "</div>",
             "<h2>At a glance</h2><div class='cards'>"
             + "".join(f"<div class='card'><span class='muted'>{e(k)}</span><b>{e(v)}</b></div>" for k, v in cards)
             + "</div>",
             "<p>Error <b>enters</b> most at " + ", ".join(f"<code>{e(r.name)}</code> (isolated MSE {r.isolated.mse:.3g})"
                                                          for r in worst_iso)
             + ". It <b>accumulates</b> most at " + (", ".join(f"<code>{e(r.name)}</code> (+{_growth_db(r):.1f} dB lost)"
                                                            for r in worst_growth) or "no node") + ".</p>"]
    if images:
        parts.append("<h2>Plots</h2><div class='plots'>" + "".join(
            f"<img alt='{e(name)}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>"
            for name, data in images.items()) + "</div>")
    head = ["#", "node", "module", "type", "params", "iso MSE", "iso SQNR dB", "iso cos", "prop MSE",
            "prop SQNR dB", "prop cos", "growth dB", "mode", "why"]
    if parity is not None:
        head.append("parity (steps)")
    if sensitivity:
        head += ["only this node", "all but this node"]
    parts.append("<h2>Per node, in graph order</h2><p class='muted'>Click a column to sort. Growth: SQNR lost "
                 "between the node's own error (isolated: float inputs) and the network's (propagated).</p>"
                 "<table class='sortable'><thead><tr>"
                 + "".join(f"<th class='{'l' if h in ('node', 'module', 'type', 'mode', 'why') else ''}'>{e(h)}</th>"
                           for h in head) + "</tr></thead><tbody>")
    for i, r in enumerate(rows):
        mode = "" if selection is None else ("QAT" if r.name in trained else "frozen")
        cells = [_num(i, "d"), f"<td class='l' data-v='{e(r.name)}'>{e(r.name)}</td>",
                 f"<td class='l' data-v='{e(r.source)}'>{e(r.source)}</td>",
                 f"<td class='l' data-v='{e(r.module_type)}'>{e(r.module_type)}</td>", _num(r.params, ","),
                 _num(r.isolated.mse, ".3g"), _num(r.isolated.sqnr_db, ".1f"), _num(r.isolated.cosine, ".4f"),
                 _num(r.propagated.mse, ".3g"), _num(r.propagated.sqnr_db, ".1f"), _num(r.propagated.cosine, ".4f"),
                 _num(_growth_db(r), "+.1f"), f"<td class='l' data-v='{mode}'>{mode}</td>",
                 f"<td class='l' data-v='{e(why(r, selection, policy))}'>{e(why(r, selection, policy))}</td>"]
        if parity is not None:
            p = parity_rows.get(r.name)
            if p is None:
                reason = dict(parity.not_compared).get(r.name, "not compared")
                cells.append(f"<td data-v='' title='{e(reason)}'>-</td>")
            else:
                steps = p.lsb(p.isolated_max_abs)
                text = f"{steps:.2g}" if steps is not None else f"{p.isolated_max_abs:.2g} (float)"
                cells.append(f"<td class='{'ok' if p.ok else 'bad'}' data-v='{steps if steps is not None else ''}'>"
                             f"{text} {'ok' if p.ok else 'DIVERGES'}</td>")
        if sensitivity:
            s = sensitivity.get(r.name, {})
            cells += [_num(s.get("only"), ".4g"), _num(s.get("all_but"), ".4g")]
        parts.append(f"<tr class='{mode.lower()}'>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    if config is not None or timings:
        parts.append("<h2>Configuration and timings</h2><pre>"
                     + e(json.dumps({"config": config, "timings_s": timings}, indent=1, default=str)) + "</pre>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts)
