"""The report drawn and written: report.json (stable keys), a self-contained report.html with
embedded plots, the plot PNGs and the resolved config.toml; the summary rows the CLI prints
(figures rounded for people: ms with 1-2 decimals, MiB with 1, ratios output / input).
The only library module that renders for people (``onnxws.report`` builds the dict it draws)."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from onnxws.atomic import write_atomic  # noqa: E402
from onnxws.console import printable  # noqa: E402
from onnxws.exploration import within_budget  # noqa: E402

_PNG_META = {"Software": None}


# -- JSON ----------------------------------------------------------------------------------
def _clean(value: Any) -> Any:
    """NaN/inf -> None, tuples -> lists, numpy scalars -> Python (JSON without NaN)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(report: dict, out_dir: Path, *, config_toml: str | None = None) -> dict[str, Path]:
    """Write report.json, report.html, pareto.png, sensitivity.png (and config.toml) atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean = _clean(report)
    images = {"pareto": plot_pareto(clean), "sensitivity": plot_sensitivity(clean)}
    paths = {"json": out_dir / "report.json", "html": out_dir / "report.html",
             "pareto_png": out_dir / "pareto.png", "sensitivity_png": out_dir / "sensitivity.png"}
    write_atomic(paths["pareto_png"], images["pareto"])
    write_atomic(paths["sensitivity_png"], images["sensitivity"])
    if config_toml is not None:
        paths["config"] = out_dir / "config.toml"
        write_atomic(paths["config"], config_toml.encode())
    write_atomic(paths["html"], render_html(clean, images).encode())
    write_atomic(paths["json"], (json.dumps(clean, indent=2, allow_nan=False) + "\n").encode())
    return paths


# -- plots ---------------------------------------------------------------------------------
def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata=_PNG_META, bbox_inches="tight")
    return buf.getvalue()


def _label(text: object) -> str:
    """A name as plot text: control characters escaped (no glyph warnings), ``$`` literal (not mathtext)."""
    return printable(text).replace("$", r"\$")


def _esc(text: object) -> str:
    """A name as HTML text: control characters escaped, then HTML-escaped."""
    return html.escape(printable(text))


def _unit(report: dict) -> str:
    return "pp" if report.get("final", {}).get("loss_unit", "pp") == "pp" else "% of baseline"


def plot_pareto(report: dict) -> bytes:
    """Explored tuples: loss (predicted hollow, measured filled) vs CR; front, budget, choice, uniform."""
    fig = Figure(figsize=(7.5, 4.6))
    ax = fig.add_subplot()
    exploration = report.get("exploration", {})
    explored = [e for e in exploration.get("explored", []) if e.get("subset") == "search" and len(e.get("k", {})) > 1]
    measured = [(e["ratio"], e["loss_measured"]) for e in explored if e.get("loss_measured") is not None]
    predicted = [(e["ratio"], e["loss_predicted"], e.get("loss_measured")) for e in explored if e.get("loss_predicted") is not None]
    for ratio, pred, meas in predicted:
        if meas is not None:
            ax.plot([ratio, ratio], [pred, meas], color="#9aa5b1", lw=0.8, zorder=1)
    if predicted:
        ax.scatter([p[0] for p in predicted], [p[1] for p in predicted], facecolors="none", edgecolors="#3b82f6",
                   s=36, label="predicted loss", zorder=2)
    if measured:
        ax.scatter([m[0] for m in measured], [m[1] for m in measured], color="#1d4ed8", s=18,
                   label="measured loss (search subset)", zorder=3)
    front = sorted((p["ratio"], p["loss_predicted"]) for p in exploration.get("pareto", []) if p.get("loss_predicted") is not None)
    if front:
        ax.step([f[0] for f in front], [f[1] for f in front], where="post", color="#60a5fa", lw=1, label="predicted front")
    budget = report.get("budget", {}).get("loss")
    if budget is not None:
        ax.axhline(budget, color="#dc2626", ls="--", lw=1, label=f"budget {budget:g} {_unit(report)}")
    comp, final = report.get("compression", {}), report.get("final", {})
    if comp.get("ratio_theoretical") and final.get("loss") is not None:
        ax.scatter([comp["ratio_theoretical"]], [final["loss"]], marker="*", s=220, color="#16a34a", zorder=5,
                   label="chosen (full set)")
        ax.annotate(f"{comp['ratio_theoretical']:.1f}x, {final['loss']:.2f}", (comp["ratio_theoretical"], final["loss"]),
                    textcoords="offset points", xytext=(8, 6), fontsize=9)
    uniform = report.get("uniform_baseline")
    if uniform and uniform.get("ratio_theoretical"):
        ax.scatter([uniform["ratio_theoretical"]], [uniform["loss"]], marker="s", s=60, color="#f59e0b", zorder=4,
                   label="uniform k (full set)")
        ax.annotate(f"uniform k={uniform['k']}", (uniform["ratio_theoretical"], uniform["loss"]),
                    textcoords="offset points", xytext=(8, -12), fontsize=9)
    values = [m[1] for m in measured] + [p[1] for p in predicted] + ([budget] if budget else [])
    if values:
        top = max(3 * (budget or 1.0), 1e-3)
        ax.set_ylim(min(min(values), 0) - 0.05 * top, top)
    ax.set_xscale("log")
    times = FuncFormatter(lambda value, _: f"{value:g}x")
    ax.xaxis.set_major_formatter(times)
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}x" if f"{value:g}"[0] in "235" else ""))
    ax.set_xlabel("compression ratio over shared tensors (theoretical)")
    ax.set_ylabel(f"accuracy loss ({_unit(report)})")
    name = Path(report.get("model", {}).get("path") or "model").name
    ax.set_title(_label(f"{name}: explored tuples"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


def plot_sensitivity(report: dict) -> bytes:
    """Heat map of each layer's loss when shared alone, per index width: one row per tensor, one
    column per width; the number in a cell is the loss (``~`` marks a proxy estimate, not scored;
    ``>`` the least loss of a scoring stopped early once it was certainly past the cap),
    colours centre on the budget (green within, red past it), the chosen width is outlined."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle

    layers = [layer for layer in report.get("layers", []) if layer.get("candidates")]
    widths = sorted({c["bits"] for layer in layers for c in layer["candidates"] if c.get("loss") is not None})
    budget = report.get("budget", {}).get("loss") or 1.0
    fig = Figure(figsize=(max(4.5, 1.2 + 0.62 * len(widths)) + 2.6, 1.4 + 0.3 * max(len(layers), 1)))
    ax = fig.add_subplot()
    if not layers or not widths:
        ax.text(0.5, 0.5, "no layer was scored alone", ha="center", va="center")
        ax.set_axis_off()
        return _png(fig)
    grid = np.full((len(layers), len(widths)), np.nan)
    source = np.full(grid.shape, "measured", dtype=object)
    for row, layer in enumerate(layers):
        for c in layer["candidates"]:
            if c.get("loss") is not None:
                grid[row, widths.index(c["bits"])] = c["loss"]
                source[row, widths.index(c["bits"])] = c.get("source")
    proxy = source == "proxy"
    marks = {"proxy": "~", "lower_bound": ">"}
    norm = TwoSlopeNorm(vmin=min(float(np.nanmin(grid)), -budget), vcenter=budget, vmax=4 * budget)
    shown = np.clip(grid, norm.vmin, norm.vmax)  # losses past 4x the budget all read as "far past it"
    image = ax.imshow(np.ma.masked_invalid(shown), cmap="RdYlGn_r", norm=norm, aspect="auto")
    for row, layer in enumerate(layers):
        for col, bits in enumerate(widths):
            value = grid[row, col]
            if math.isfinite(value):
                text = marks.get(source[row, col], "") + (f"{value:.2f}" if abs(value) < 10 else f"{value:.0f}")
                ax.text(col, row, text, ha="center", va="center", fontsize=7,
                        style="italic" if proxy[row, col] else "normal",
                        color="white" if value > 2.5 * budget else "black")
        if layer.get("bits") in widths and layer.get("k"):
            ax.add_patch(Rectangle((widths.index(layer["bits"]) - 0.5, row - 0.5), 1, 1, fill=False, lw=2,
                                   edgecolor="#111827"))
    ax.set_xticks(range(len(widths)), [f"{b} bit\nk={2 ** b}" for b in widths], fontsize=7)
    ax.set_yticks(range(len(layers)), [_label(layer["name"][:40]) for layer in layers], fontsize=7)
    ax.set_title(f"Loss of each layer shared alone ({_unit(report)}; outlined: chosen; ~: proxy, not scored; "
                 ">: at least, stopped early)",
                 fontsize=9)
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label(f"loss alone ({_unit(report)}); budget {budget:g} at the centre, >= {4 * budget:g} darkest red", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    return _png(fig)


# -- HTML ----------------------------------------------------------------------------------
def _bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}%"


def _num(v: Any, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec) if isinstance(v, (int, float)) else _esc(v)


def _measured(entry: dict | None, unit: str) -> str:
    """``0.550 pp [0.200, 0.950], 2000 samples`` (the loss, its 95 % interval, the set's size)."""
    if not entry:
        return "–"
    groups = f" in {entry['groups']} groups" if entry.get("groups") else ""
    low, high = entry["interval"]
    return f"{entry['loss']:.3f} {unit} [{low:.3f}, {high:.3f}], {entry['samples']} samples{groups}"


def _interval_cards(f: dict, unit: str) -> list[tuple[str, str, str]]:
    """(label, value, note) cards of the held-out and whole-set losses and the resolution."""
    cards = []
    for key, label in (("holdout", "Loss, held-out"), ("whole", "Loss, whole set")):
        entry = f.get(key)
        if entry:
            low, high = entry["interval"]
            groups = f", {entry['groups']} groups" if entry.get("groups") else ""
            cards.append((label, f"{entry['loss']:.3f} {unit}",
                          f"95% interval [{low:.3f}, {high:.3f}]; {entry['samples']} samples{groups}"))
    if "whole" in f:
        resolution = f.get("resolution")
        cards.append(("Resolution", f"{resolution:.3f} {unit}" if resolution is not None else "–",
                      _esc(f.get("resolution_note") or "95% half-width of the unmodified model's metric on this set")))
    return cards


def _loss_rows(report: dict, unit: str) -> list[tuple[str, str]]:
    """The loss rows, the held-out one first: held-out, whole set, searched set vs the budget, resolution."""
    f = report["final"]
    budget = f"budget {report['budget']['loss']:g} {unit}"
    if "whole" not in f:  # a report of an earlier version
        return [("Accuracy loss", f"{f['loss']:.3f} {unit} ({budget})")]
    rows = []
    if f.get("holdout"):
        rows.append(("Loss, held-out samples (95% interval)", _measured(f["holdout"], unit)))
    rows.append(("Loss, whole set (95% interval)", _measured(f["whole"], unit)))
    rows.append(("Loss, searched set vs budget", f"{f['loss']:.3f} {unit} ({budget})"))
    resolution = f.get("resolution")
    rows.append(("Resolution of the set", f"{resolution:.3f} {unit}" if resolution is not None else "cannot be stated"))
    if f.get("resolution_note"):
        rows.append(("Note", f["resolution_note"]))
    return rows


def summary_rows(report: dict) -> list[tuple[str, str]]:
    """Key figures as (label, value) pairs, for the terminal and the HTML card."""
    b, f, c, e = report["baseline"], report["final"], report["compression"], report["exploration"]
    unit = "pp" if f["loss_unit"] == "pp" else "% of baseline"
    rows = [
        ("Metric", report["metric"]),
        ("Baseline -> final (searched set)", f"{_pct(b['value'])} -> {_pct(f['value'])}"),
        *_loss_rows(report, unit),
        ("CR, shared tensors (theoretical)", f"{c['ratio_theoretical']:.2f}x"),
        ("CR, whole model (theoretical)", f"{c['ratio_whole_theoretical']:.2f}x"),
        ("File ratio (bytes in / bytes out)", f"{c['ratio_file']:.2f}x ({_bytes(c['bytes_before'])} -> {_bytes(c['bytes_after'])})"),
        ("Packing efficiency", f"{c['packing_efficiency']:.3f}"),
        ("Scorings (run / cached)", f"{e['scorings']} ({e['scorings_run']} / {e['scorings_cached']})"),
        ("Time", f"{e['seconds'].get('total', 0):.1f} s on {report['device']}"),
        ("Stopped by", e["stopped_by"]),
    ]
    deploy = _deploy_line(report.get("deployability"))
    if deploy:
        rows.append(("Deployability (CPU ORT, 1 thread)", deploy))
    u = report.get("uniform_baseline")
    if u:
        at = next(i for i, (label, _) in enumerate(rows) if label.startswith("CR, shared")) + 1
        rows.insert(at, ("Uniform k baseline", f"k={u['k']}: {u['ratio_theoretical']:.2f}x at {u['loss']:.3f} {unit}"))
    return rows


def _ms(seconds: float | None) -> str:
    """Seconds as milliseconds for people: 2 decimals below 100 ms, 1 above."""
    if seconds is None:
        return "–"
    ms = 1000 * seconds
    return f"{ms:.2f} ms" if ms < 100 else f"{ms:.1f} ms"


def _mib(n: float | None) -> str:
    return "–" if n is None else f"{n / 2**20:.1f} MiB"


def _times(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio:.2f}×"


def _oldest(side: dict) -> str:
    release = side.get("onnxruntime_min")
    return f"onnxruntime ≥ {release}" if release else "newer than the table's releases"


def _deploy_line(deploy: dict | None) -> str | None:
    """The deployability summary row: the output's oldest onnxruntime, its session, batch and memory
    figures with their ratios to the input's; None when the report has none."""
    if not deploy or "output" not in deploy:
        return None
    out, ratio = deploy["output"], deploy.get("output_vs_input") or {}
    release = out.get("onnxruntime_min")
    head = f"onnxruntime >= {release}" if release else "onnxruntime newer than the table's releases"
    session = out.get("session") or {}
    if "error" in session:
        return f"{head}; {session['error']}"

    def vs(key: str) -> str:
        return f" ({ratio[key]:.2f}x input)" if ratio.get(key) is not None else ""

    return (f"{head}; session {_ms(session['create_seconds'])}{vs('create_seconds')}, batch of {session['batch']} "
            f"{_ms(session['latency_seconds'])}{vs('latency_seconds')}, peak +{_mib(session['peak_rss_bytes'])}"
            f"{vs('peak_rss_bytes')}")


def _deploy_html(deploy: dict | None) -> str:
    """The Deployability section: requirements and CPU measurements of the input and the output
    model side by side, the output's over the input's, and how each figure is derived."""
    if not deploy:
        return "<p>Not assessed.</p>"
    if "input" not in deploy or "output" not in deploy:
        return f"<p>Not assessed: {_esc(deploy.get('error', 'no figures'))}.</p>"
    sides = [deploy["input"], deploy["output"]]
    ratio = deploy.get("output_vs_input") or {}
    sessions = [side.get("session") or {} for side in sides]
    measured = deploy.get("measured_with") or {}

    def timed(session: dict, key: str, repeats: str) -> str:
        return f"{_ms(session[key])} (median of {session[repeats]})" if key in session else "–"

    def row(label: str, cells: list[str], key: str | None = None) -> list[str]:
        return [_esc(label), *cells, _times(ratio.get(key)) if key else ""]

    rows = [
        row("Opsets", [_esc(", ".join(f"{d} {v}" for d, v in side["opsets"].items()) or "none") for side in sides]),
        row("IR version", [str(side["ir_version"]) for side in sides]),
        row("Element types", [_esc(", ".join(side["element_types"])) for side in sides]),
        row("Oldest onnxruntime", [_esc(_oldest(side)) for side in sides]),
        row("Based on", [_esc(side["onnxruntime_min_basis"]) for side in sides]),
        row("Session creation", [timed(s, "create_seconds", "create_repeats") for s in sessions], "create_seconds"),
        row(f"Latency, batch of {measured.get('batch', '–')}",
            [timed(s, "latency_seconds", "latency_repeats") for s in sessions], "latency_seconds"),
        row("Peak memory growth", [_mib(s.get("peak_rss_bytes")) for s in sessions], "peak_rss_bytes"),
        row("Resident after the batch", [_mib(s.get("rss_bytes")) for s in sessions], "rss_bytes"),
    ]
    errors = "".join(f"<li>{name} model: {_esc(s['error'])}</li>" for name, s in zip(("input", "output"), sessions)
                     if "error" in s)
    methods = measured.get("methods") or {}
    memory_methods = sorted({s["memory_method"] for s in sessions if s.get("memory_method")})
    how = (f"<p class=\"defs\">Measured in onnxruntime {_esc(measured.get('onnxruntime', '–'))} on "
           f"{_esc(measured.get('provider', 'CPU'))} with {_esc(measured.get('intra_op_threads', 1))} intra-op thread, "
           "ORT's default graph optimisations, each model read from its file. Session creation: "
           f"{_esc(methods.get('session', '–'))}. Latency: {_esc(methods.get('latency', '–'))}. Memory: "
           f"{_esc(methods.get('memory', '–'))} ({_esc('; '.join(memory_methods) or '–')}). "
           f"Oldest onnxruntime: {_esc(deploy.get('onnxruntime_min_note', ''))}.</p>")
    return (_table(["", "input", "output", "output / input"], rows, {3})
            + (f"<ul>{errors}</ul>" if errors else "") + how)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f5f7fa;color:#1f2933}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:1.5rem;margin:0 0 4px} h2{font-size:1.15rem;margin:28px 0 10px}
.sub{color:#616e7c;margin-bottom:18px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(190px,1fr));gap:12px}
.card{background:#fff;border-radius:10px;padding:14px 16px;box-shadow:0 1px 3px rgba(0,0,0,.08)}
.card .label{font-size:.78rem;color:#616e7c;text-transform:uppercase;letter-spacing:.03em}
.card .value{font-size:1.35rem;font-weight:600;margin-top:4px}
.card .note{font-size:.8rem;color:#7b8794;margin-top:2px}
.compare{background:#fff;border-left:4px solid #16a34a;padding:10px 14px;border-radius:6px;margin-top:14px}
table{border-collapse:collapse;width:100%;background:#fff;border-radius:8px;overflow:hidden;font-size:.86rem}
th,td{padding:6px 9px;text-align:left;border-bottom:1px solid #e4e7eb;vertical-align:top}
th{background:#e4e7eb;font-weight:600} tr:nth-child(even) td{background:#fafbfc}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:9px;background:#3b82f6;border-radius:3px;vertical-align:middle;margin-right:6px}
img{max-width:100%;background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08)}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:14px}
details{margin-top:10px} code{background:#e4e7eb;padding:1px 4px;border-radius:3px}
.defs{font-size:.85rem;color:#52606d}
"""


def _tuple_text(tup: dict[str, int]) -> str:
    return ", ".join(f"{name}={k}" for name, k in tup.items())


def _table(headers: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: dict, images: dict[str, bytes]) -> str:
    """One self-contained HTML page (inline CSS, plots as data URIs)."""
    esc = _esc
    b, f, c, e = report["baseline"], report["final"], report["compression"], report["exploration"]
    unit = "pp" if f["loss_unit"] == "pp" else "% of baseline"
    name = Path(report.get("model", {}).get("path") or "model").name
    cards = [
        ("Accuracy", f"{_pct(b['value'])} → {_pct(f['value'])}", f"{esc(report['metric'])}, full set ({report['data']['n_full']} samples)"),
        ("Loss", f"{f['loss']:.3f} {unit}", f"searched set; budget {report['budget']['loss']:g} {unit}; search subset {_num(f.get('loss_search'))}"),
        *_interval_cards(f, unit),
        ("CR shared tensors", f"{c['ratio_theoretical']:.2f}×", "theoretical: stored bits of the shared tensors vs fp32/fp16"),
        ("CR whole model", f"{c['ratio_whole_theoretical']:.2f}×", "theoretical, unshared tensors at full size"),
        ("File ratio", f"{c['ratio_file']:.2f}×", f"{_bytes(c['bytes_before'])} → {_bytes(c['bytes_after'])}"),
        ("Packing efficiency", f"{c['packing_efficiency']:.3f}", f"graph overhead {_bytes(c.get('graph_overhead_bytes'))}"),
        ("Scorings", f"{e['scorings']}", f"{e['scorings_run']} run ({e.get('scorings_stopped_early', 0)} stopped early "
                                         f"once past the cap), {e['scorings_cached']} cached"),
        ("Time", f"{e['seconds'].get('total', 0):.1f} s", f"{esc(report['device'])}, stopped by {esc(e['stopped_by'])}"),
    ]
    card_html = "".join(f'<div class="card"><div class="label">{esc(l)}</div><div class="value">{v}</div>'
                        f'<div class="note">{n}</div></div>' for l, v, n in cards)
    u = report.get("uniform_baseline")
    compare = (f"<b>Uniform k={u['k']}</b> (same k for every layer): {u['ratio_theoretical']:.2f}× at {u['loss']:.3f} {unit} "
               f"&nbsp;·&nbsp; <b>onnxws per-layer</b>: {c['ratio_theoretical']:.2f}× at {f['loss']:.3f} {unit} "
               f"({c['ratio_theoretical'] / u['ratio_theoretical']:.2f}× more compression)") if u else \
        "No uniform k fits the budget; the per-layer solution is the only one within it."
    layer_rows = []
    for layer in report.get("layers", []):
        share = layer.get("share_of_size")
        bar = f'<span class="bar" style="width:{max(2, int(120 * share))}px"></span>{100 * share:.1f}%' if share else "–"
        layer_rows.append([esc(layer["name"]), esc(layer["op_type"]), esc("×".join(map(str, layer["shape"]))),
                           f"{layer['params']:,}", _num(layer.get("k"), "d"), _num(layer.get("bits"), "d"),
                           esc(str(layer.get("index_dtype"))), esc(str(layer.get("granularity") or "–")),
                           "yes" if layer.get("refined") else esc(f"no: {layer.get('refine_reason') or '–'}"),
                           esc(f"yes ({layer['bias']})") if layer.get("bias_corrected")
                           else esc(f"no: {layer.get('bias_reason') or '–'}"),
                           _num(layer.get("loss_alone")), _bytes(layer.get("stored_bytes")), bar])
    layers_html = _table(["tensor", "op", "shape", "params", "k", "bits", "index type", "granularity", "refined",
                          "bias corrected", f"loss alone ({unit})", "stored", "share of size"], layer_rows, {3, 4, 5, 10, 11})
    refinement = report.get("refinement") or {}
    refine_html = (f"<p>Output-aware refinement: {len(refinement.get('refined', []))} of {len(report.get('layers', []))} shared "
                   "tensors refined against their layer's input moments measured on the search subset (indices chosen "
                   "with error feedback, codebook refitted by least squares; a candidate keeps its k-means form unless "
                   "that lowers its output error). "
                   f"{len(refinement.get('bias_corrected') or {})} of them with their own bias corrected for the mean "
                   "shift of their outputs on the same inputs.</p>") if refinement.get("enabled") else \
        "<p>Output-aware refinement off: candidates are plain k-means.</p>"
    img = {k: base64.b64encode(v).decode() for k, v in images.items()}
    pred = e.get("predictor")
    pred_html = "<p>No predictor for this strategy.</p>"
    if pred:
        rows = [[esc(n), f"{a:.3f}"] for n, a in pred.get("alphas", {}).items()]
        by_model = pred.get("loo_mae_by_model") or {}
        chosen = (f" Chosen by leave-one-out error on the scored tuples: divergence {_num(by_model.get('divergence'))}, "
                  f"additive {_num(by_model.get('additive'))} {unit}.") if by_model else ""
        if pred.get("model") == "divergence":
            pred_html = (f"<p>AL(tuple) = g(Σ α<sub>i</sub>·D<sub>i</sub>(k<sub>i</sub>)): D<sub>i</sub> is the output divergence of layer i "
                         f"shared alone, α fitted on {pred.get('n_fit')} scored tuples ({pred.get('n_random')} random near the budget, "
                         f"the rest from active refinement; R² of the divergence sum = {_num(pred.get('r2'))}), g a monotone map "
                         f"from divergence to loss fitted on {pred.get('link_points')} scored points; mean error on the scored "
                         f"tuples {_num(pred.get('loss_mae'))} {unit}.{chosen}</p>")
        else:
            pred_html = (f"<p>AL(tuple) = Σ α<sub>i</sub>·AL<sub>i</sub>(k<sub>i</sub>) (the paper's predictor), fitted on {pred.get('n_fit')} scored tuples "
                         f"({pred.get('n_random')} random near the budget, the rest from active refinement); "
                         f"R² = {_num(pred.get('r2'))}, leave-one-out MAE = {_num(pred.get('loo_mae'))} {unit}.{chosen}</p>")
        pred_html += _table(["tensor", "α"], rows, {1})
    proxy = e.get("proxy") or {}
    proxy_html = (f"<p>Score-free proxy (output error of refined layers, clustering error of the others) vs measured layer loss: mean Spearman ρ = {_num(proxy.get('spearman'))}; "
                  f"{proxy.get('estimated_points', 0)} layer/width points estimated by the proxy instead of scored.</p>")
    seconds = e.get("seconds", {})
    time_rows = [[esc(k), f"{v:.2f}"] for k, v in seconds.items()]
    stage_rows = [[esc(k), str(v)] for k, v in e.get("scorings_by_stage", {}).items()]
    explored_rows = [[esc(_tuple_text(x["k"])), f"{x['ratio']:.2f}", _num(x.get("loss_predicted")),
                      _num(x.get("loss_measured")), esc(x["stage"]), esc(x["subset"])] for x in e.get("explored", [])]
    verify_rows = [[esc(_tuple_text(x["k"])), _num(x.get("loss_search")), _num(x.get("loss_full")),
                    "yes" if within_budget(x["loss_full"], report["budget"]["loss"]) else "no", esc(x.get("phase", "verify"))]
                   for x in e.get("verification", [])]
    edge = e.get("edge_push") or {}
    edge_html = (f"<p>Edge push: with loss to spare on the full set, up to {edge.get('max_tries')} tuples that measured up to "
                 f"{_num(edge.get('search_target'))} {unit} on the search subset (a chance of at least "
                 f"{100 * edge.get('min_probability', 0):.0f}% to hold on the full set, from the subset's sampling error) "
                 f"were verified: {edge.get('tries')} tried.</p>") if edge.get("search_target") is not None else ""
    growth_html = "".join(
        f"<p>Search subset grown from {g['from_samples']} to {g['to_samples']} samples: {g['misses']} tuple(s) within budget on it "
        f"missed on the full set, and the verified answer ({_num(g.get('verified_ratio'), '.2f')}x) was below {100 * g.get('threshold', 0.9):.0f}% of what it had promised "
        f"({g['promised_ratio']:.2f}x); the layer stage, the network stage and the verification ran again on the larger subset "
        f"(losses on the smaller one are listed under subset <code>search_{g['from_samples']}</code>)"
        + (f"; the layer stage started {g['layer_walks_from_earlier_edge']} layer walk(s) at the edge found on the smaller subset "
           f"and scored {g['layer_scorings']} tuple(s)" if "layer_scorings" in g else "") + ".</p>"
        for g in e.get("search_subset_growth", []))
    corrected_by = {bias: weight for weight, bias in (report.get("refinement", {}).get("bias_corrected") or {}).items()}
    skipped_rows = [[esc(s["name"]), esc(s["reason"] + (f"; its values are rewritten by the bias correction of "
                                                          f"{corrected_by[s['name']]} (stored as floats)"
                                                          if s["name"] in corrected_by else ""))]
                    for s in report.get("skipped", [])]
    notes = "".join(f"<li>{esc(n)}</li>" for n in report.get("encoding", {}).get("notes", [])) or "<li>none</li>"
    versions = ", ".join(f"{esc(k)} {esc(str(v))}" for k, v in report.get("versions", {}).items())
    config = esc(json.dumps(report.get("config", {}), indent=2))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>onnxws report: {esc(name)}</title><style>{_CSS}</style></head>
<body><main>
<h1>onnxws report: {esc(name)}</h1>
<div class="sub">{esc(report.get('created', ''))} · strategy <code>{esc(e['strategy'])}</code> · budget {report['budget']['loss']:g} {unit} ({esc(report['budget']['mode'])})</div>
<div class="cards">{card_html}</div>
<div class="compare">{compare}</div>
<p>Metric: {esc(report.get("metric_description") or report["metric"])}.</p>
<h2>Layers</h2>{refine_html}{layers_html}
<h2>Exploration</h2>
<div class="plots"><img alt="Pareto plot" src="data:image/png;base64,{img['pareto']}"><img alt="Layer sensitivity plot" src="data:image/png;base64,{img['sensitivity']}"></div>
<h2>Predictor</h2>{pred_html}{proxy_html}
<h2>Time and scorings per stage</h2>
<div class="plots">{_table(["stage", "seconds"], time_rows, {1})}{_table(["stage", "scorings"], stage_rows, {1})}</div>
<h2>Full-set verification</h2>{_table(["k per tensor", f"loss search ({unit})", f"loss full ({unit})", "within budget", "phase"], verify_rows, {1, 2})}{edge_html}{growth_html}
<details><summary>All {len(explored_rows)} evaluated tuples</summary>{_table(["k per tensor", "CR", "loss predicted", "loss measured", "stage", "subset"], explored_rows, {1, 2, 3})}</details>
<h2>Tensors not shared</h2>{_table(["tensor", "reason"], skipped_rows) if skipped_rows else "<p>None.</p>"}
<h2>Deployability</h2>{_deploy_html(report.get("deployability"))}
<h2>Encoding</h2><p>Output opset {report.get('encoding', {}).get('opset')}.</p><ul>{notes}</ul>
<h2>Settings and versions</h2><p>{versions}</p><details><summary>Resolved configuration</summary><pre>{config}</pre></details>
<p class="defs">Definitions: CR = Σ 32·n<sub>i</sub> / Σ (n<sub>i</sub>·b<sub>i</sub> + 32·k<sub>i</sub>) over the shared tensors (16 for fp16 weights; every codebook counted);
the whole-model CR counts unshared tensors at full size; the file ratio is bytes of the input file / bytes of the output file.
Accuracy loss (AL) = baseline − final, in {unit}. Final figures are measured on the emitted ONNX file in ONNX Runtime on the full evaluation set.</p>
</main></body></html>
"""
