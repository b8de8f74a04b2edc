"""The zoo's current state: the newest record of every model over all ``benchmarks/results/zoo*.json``.

    python benchmarks/zoo_summary.py [--results DIR] [--md PATH] [--json PATH] [--no-list]

The zoo runs one model per subprocess and takes hours at one thread, so its results come in several
files, one per run (``zoo.py --json``); a model measured twice counts once, by its newest run (the
``started`` time in each file's meta). This script reads them all, keeps that record per model, checks
the set against every architecture ``zoo_models.all_models()`` lists (torchvision's registry and the
timm selection) and writes a table (which run, at which commit, parity per runtime with coverage,
graph breaks, fidelity gaps to PT2E) with the same summary lines as ``zoo.py``. It measures nothing:
each figure is the one its run recorded, and the table says which commit that was.

The fidelity gaps are also counted over well-conditioned float references only: a record's
``signal.logit_norm_spread`` (``zoo_models.logit_norm_spread``), or for records written before
``zoo.py`` measured it, the figure ``zoo_conditioning.py`` measured for the same model and image
size (``results/zoo_conditioning.json``). Ill-conditioned models are listed, never dropped silently.
"""

from __future__ import annotations

import argparse
import collections
import copy
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zoo  # noqa: E402
import zoo_models  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# The last change to what check_parity judges (or to a runtime's lowering it judges): a parity cell from
# a run started before it was judged by the earlier check, and the summary counts those apart.
CHECK_CHANGED = ("Wed Dec  2 02:12:00 2026", "761f023: float outputs' tolerance is the root-sum-square of one step "
                 "per input of the last layer, not all in the worst direction; inductor's ceil-mode int8 max pools "
                 "fixed (passes/explicit_ceil_pooling.py)")


def _started(meta: dict) -> datetime.datetime:
    return datetime.datetime.strptime(meta["started"], "%a %b %d %H:%M:%S %Y")


def newest_records(results: Path) -> dict[str, dict]:
    """model -> its newest record, with ``run`` (file, label, commit, started, runtimes) added.

    A runtime the newest run did not measure (``zoo.py --runtimes`` a subset) comes from the newest
    earlier run of that model that did, listed in the record's ``filled`` (runtime -> that run); with
    runtime "torch" go the default recipe's other figures (its fidelity, selection, graph breaks)."""
    runs: dict[str, list[tuple[datetime.datetime, dict]]] = {}
    for path in sorted(results.glob("zoo*.json")):
        if path.name.startswith(("zoo_summary", "zoo_conditioning")):
            continue
        data = json.loads(path.read_text())
        meta = data["meta"]
        when = _started(meta)
        run = {"file": path.name, "label": meta.get("label", ""), "started": meta["started"],
               "commit": (meta.get("fxptqat") or {}).get("git_head"), "cpu": meta.get("cpu"),
               "runtimes": list(meta.get("runtimes", zoo.RUNTIMES))}
        for rec in data["records"]:
            runs.setdefault(rec["model"], []).append((when, {**rec, "run": run}))
    return {name: _fill(sorted(recs, key=lambda r: r[0], reverse=True)) for name, recs in runs.items()}


def _fill(recs: list[tuple[datetime.datetime, dict]]) -> dict:
    newest = copy.deepcopy(recs[0][1])
    newest["filled"] = {}
    if not newest.get("traced"):
        return newest
    for runtime in zoo.RUNTIMES:
        if runtime in newest["run"]["runtimes"]:
            continue
        older = next((r for _, r in recs[1:] if runtime in r["run"]["runtimes"] and r.get("runtimes", {}).get(runtime)),
                     None)
        if older is None:
            continue
        newest["runtimes"][runtime] = older["runtimes"][runtime]
        newest["filled"][runtime] = older["run"]
        if runtime == "inductor":  # whether that run's inductor lowering had 7-bit activations
            newest["inductor_reduce_range"] = older.get("inductor_reduce_range")
        if runtime == "torch":  # the default recipe's figures come from the same run
            for key in ("fxptqat", "fxptqat_fake_quant"):
                newest["fidelity"][key] = older["fidelity"].get(key)
            newest["selection"], newest["dynamo"] = older.get("selection"), older.get("dynamo")
    newest["run"] = {**newest["run"], "runtimes": sorted({*newest["run"]["runtimes"], *newest["filled"]},
                                                          key=zoo.RUNTIMES.index)}
    return newest


def attach_conditioning(records: dict[str, dict], path: Path) -> None:
    """Give each record without ``signal.logit_norm_spread`` the one ``zoo_conditioning.py`` measured for
    the same model at the same image size (marked ``conditioning_from``)."""
    if not path.exists():
        return
    data = json.loads(path.read_text())
    measured = {r["model"]: r for r in data["records"] if r.get("signal")}
    for name, rec in records.items():
        if spread_of(rec) is not None or name not in measured:
            continue
        other = measured[name]
        if other["image_size"] != rec.get("image_size"):
            continue
        rec["signal"] = {**(rec.get("signal") or {}), "logit_norm_spread": other["signal"]["logit_norm_spread"]}
        rec["conditioning_from"] = path.name


def spread_of(rec: dict) -> dict | None:
    return (rec.get("signal") or {}).get("logit_norm_spread")


def _spread_cell(rec: dict) -> str:
    spread = spread_of(rec)
    if spread is None:
        return "-"
    mark = " ill" if spread["ill_conditioned"] else ""
    return f"{spread['max_over_median']:.3g}{mark}{'+' if rec.get('conditioning_from') else ''}"


def _gap(ours, rec) -> str:
    peer = rec["fidelity"].get("pt2e")
    return "-" if not (ours and peer) else f"{ours['cosine_mean'] - peer['cosine_mean']:+.4f}"


def _parity(rec: dict, runtime: str) -> str:
    if runtime not in rec["run"]["runtimes"]:
        return "not run"
    r = rec["runtimes"].get(runtime) or {}
    if "parity_ok" not in r:
        return "-"
    older = "*" if runtime in rec.get("filled", {}) else ""
    return f"{'ok' if r['parity_ok'] else 'FAIL'} {r.get('compared', '?')}/{r.get('weighted_nodes', '?')}{older}"


def markdown(records: dict[str, dict], expected: list[str] | None) -> str:
    names = sorted(records, key=lambda n: (zoo_models.source_of(n), n))
    lines = ["# Model zoo, newest record per model (`python benchmarks/zoo_summary.py`)", "",
             "Each row is the newest run of that model over `benchmarks/results/zoo*.json` (run = the file's label "
             "and start time; commit = fxptqat's git HEAD in that run). Gaps are mean logit cosine to FP32 minus "
             "PT2E's (X86InductorQuantizer) on the same model, images and calibration. FP32 spread = max / median "
             "of the float model's per-image logit norm over the calibration and evaluation images "
             f"(`zoo_models.logit_norm_spread`; 'ill' above {zoo_models.ILL_CONDITIONED_SPREAD:g}; + = measured by "
             "`zoo_conditioning.py` for a record that predates it).", "",
             "| model | run | commit | parity torch | parity ort | parity inductor | graph breaks | FP32 spread | "
             "weighted ort - PT2E | default - PT2E |", "|---" * 10 + "|"]
    for name in names:
        rec = records[name]
        run = rec["run"]
        breaks = (rec.get("dynamo") or {}).get("graph_breaks", "-") if rec["traced"] else "-"
        breaks = f"{breaks}*" if "torch" in rec.get("filled", {}) and breaks != "-" else breaks
        status = "" if rec["status"] == "ok" else f" ({rec['status']})"
        lines.append(
            f"| {name}{status} | {run['label'] or run['file']} ({run['started'][4:16]}) | {run['commit'] or '-'} | "
            + " | ".join(_parity(rec, r) for r in zoo.RUNTIMES)
            + f" | {breaks} | {_spread_cell(rec)} | "
            f"{_gap((rec['runtimes'].get('onnxruntime') or {}).get('cosine_vs_fp32'), rec)} | "
            f"{_gap(rec['fidelity'].get('fxptqat'), rec)}{'*' if 'torch' in rec.get('filled', {}) else ''} |")
    lines += ["", "Summary:", "", *zoo.summary([records[n] for n in names], zoo.RUNTIMES)]
    gaps = sorted((o["cosine_mean"] - p["cosine_mean"], n, p["cosine_mean"]) for n in names
                  if (o := (records[n]["runtimes"].get("onnxruntime") or {}).get("cosine_vs_fp32"))
                  and (p := records[n]["fidelity"].get("pt2e")))
    if gaps:
        lines.append(_distribution("- Weighted onnxruntime - PT2E, distribution", gaps))
        spreads = {n: spread_of(records[n]) for _, n, _ in gaps}
        well = [g for g in gaps if spreads[g[1]] is not None and not spreads[g[1]]["ill_conditioned"]]
        ill = [g for g in gaps if spreads[g[1]] is not None and spreads[g[1]]["ill_conditioned"]]
        unknown = [n for _, n, _ in gaps if spreads[n] is None]
        lines.append(_distribution(f"- The same over well-conditioned FP32 references (spread <= "
                                   f"{zoo_models.ILL_CONDITIONED_SPREAD:g})", well))
        if ill:
            lines.append(f"- Ill-conditioned FP32 references ({len(ill)}, not in the line above; ours ahead of PT2E on "
                         f"{sum(g >= 0 for g, _, _ in ill)}): " + ", ".join(
                             f"{n} {g:+.4f} (spread {spreads[n]['max_over_median']:.3g}, PT2E's cosine {p:.3f})"
                             for g, n, p in sorted(ill, key=lambda t: t[1])) + ".")
        if unknown:
            lines.append(f"- Without a conditioning figure: {', '.join(unknown)}.")
    since = datetime.datetime.strptime(CHECK_CHANGED[0], "%a %b %d %H:%M:%S %Y")
    traced = [n for n in names if records[n]["traced"]]
    current = {rt: sum(1 for n in traced if rt in records[n]["runtimes"] and _started(
        records[n].get("filled", {}).get(rt, records[n]["run"])) >= since) for rt in zoo.RUNTIMES}
    lines.append(f"- Parity cells judged by the current check (runs started after {CHECK_CHANGED[1]}): "
                 + ", ".join(f"{rt} {k}/{len(traced)}" for rt, k in current.items())
                 + "; the others by the earlier, looser one.")
    filled = collections.Counter(rt for n in names for rt in records[n].get("filled", {}))
    if filled:
        lines.append("- Cells marked * come from the newest earlier run of that model that measured them (its newest run "
                     "did not): " + ", ".join(f"{rt} on {k} models" for rt, k in sorted(filled.items())) + "; "
                     "with torch go the default recipe's fidelity and the graph breaks.")
    recipes = collections.Counter(json.dumps(records[n].get("weighted_recipe")) for n in names if records[n]["traced"])
    if recipes:
        lines.append("- Weighted recipe of the onnxruntime figures: " + ", ".join(
            f"{'before `weighted_recipe` was recorded (no bias correction)' if r == 'null' else r} on {k} models"
            for r, k in recipes.most_common()) + ".")
    partial = [n for n in names if set(records[n]["run"]["runtimes"]) != set(zoo.RUNTIMES)]
    if partial:
        lines.append(f"- Runs without every runtime: {', '.join(partial)}.")
    if expected is not None:
        missing = [n for n in expected if n not in records]
        lines.append(f"- Architectures listed by `zoo_models.all_models()`: {len(expected)}; with a record: "
                     f"{len(expected) - len(missing)}" + (f"; without: {', '.join(missing)}" if missing else "") + ".")
    commits = sorted({r["run"]["commit"] or "-" for r in records.values()})
    lines.append(f"- Records come from {len({r['run']['file'] for r in records.values()})} runs at "
                 f"{len(commits)} commits ({', '.join(commits)}).")
    return "\n".join(lines) + "\n"


def _distribution(title: str, gaps: list[tuple[float, str, float]]) -> str:
    if not gaps:
        return f"{title}: no models."
    return (f"{title}: " + ", ".join(f">= {t:g}: {sum(g >= t for g, _, _ in gaps)}/{len(gaps)}"
                                     for t in (0, -1e-4, -1e-3, -1e-2))
            + "; more than 0.01 below: " + (", ".join(f"{n} {g:+.4f} (PT2E's own cosine {p:.3f})"
                                                     for g, n, p in gaps if g < -1e-2) or "none") + ".")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--md", type=Path, help="default RESULTS/zoo_summary.md")
    p.add_argument("--json", type=Path, help="default RESULTS/zoo_summary.json")
    p.add_argument("--no-list", action="store_true", help="do not import torchvision/timm to list the architectures")
    p.add_argument("--conditioning", type=Path, help="default RESULTS/zoo_conditioning.json")
    args = p.parse_args(argv)
    records = newest_records(args.results)
    attach_conditioning(records, args.conditioning or args.results / "zoo_conditioning.json")
    if not records:
        print(f"no zoo*.json records under {args.results}", file=sys.stderr)
        return 1
    expected = None if args.no_list else zoo_models.all_models()
    text = markdown(records, expected)
    (args.md or args.results / "zoo_summary.md").write_text(text)
    (args.json or args.results / "zoo_summary.json").write_text(json.dumps(
        {"models": {n: {"run": r["run"], "status": r["status"], "traced": r["traced"],
                        "full_parity": zoo.full_parity(r, zoo.RUNTIMES) if r["traced"] else None,
                        "logit_norm_spread": spread_of(r), "conditioning_from": r.get("conditioning_from"),
                        "filled_from": {rt: run["file"] for rt, run in r.get("filled", {}).items()}}
                    for n, r in sorted(records.items())}}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
