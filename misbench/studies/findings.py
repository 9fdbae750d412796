"""The demo's findings as sentences generated from its numbers (README "What the demo finds").

`demo_facts` reads the numbers of a finished demo folder (report/sweep.csv, paired.csv, summary.json,
classwise_summary.json, compare/compare.json); `findings_text` turns one folder's facts, and `spread_text`
several seeds' facts, into sentences that say only what the intervals support: a difference is "higher" or
"lower" only when its 95 % interval excludes 0. The questions the report's findings box answers too (the
paired runs, the rate correlations, the class units, the populations compared) are the box's own sentences
(misbench/reports/findings.py), made from the same numbers; the README adds the control, the untrained
network, the runs at chance accuracy and the spread across seeds. `scripts/demo_findings.py` writes them into the README, with the
facts beside them, and tests/test_readme.py regenerates the sentences from those facts.
"""

__all__ = ["demo_facts", "findings_text", "spread_text", "direction"]

import json
from pathlib import Path

from ..reports.findings import classwise_finding, compare_finding, paired_finding, rate_finding
from ..runtime.fileio import read_csv_rows


def _num(value):
    return None if value in ("", None) else float(value)


def direction(low, high) -> str:
    """'higher' / 'lower' when the interval excludes 0, else 'no detectable difference'."""
    if low is not None and low > 0:
        return "higher"
    if high is not None and high < 0:
        return "lower"
    return "no detectable difference"


def demo_facts(out_dir) -> dict:
    """The numbers the findings quote, from a finished demo (or study) folder."""
    report = Path(out_dir) / "report"
    summary = json.loads((report / "summary.json").read_text())
    runs = {}
    for r in read_csv_rows(report / "sweep.csv"):
        runs[r["name"]] = {"method": r["method"], "rate": _num(r["rate"]), "top1": _num(r.get("top1")),
                           "mis": _num(r["mis"]), "conf": _num(r["mis_confidence"]),
                           "n_sparse": int(_num(r.get("n_sparse")) or 0), "retrained": "noretrain" not in r["name"]}
    if (report / "paired.csv").exists():
        for r in read_csv_rows(report / "paired.csv"):
            if r["layer"] == "features" and r["name"] in runs:
                runs[r["name"]]["paired"] = [_num(r["diff_mis_confidence"]), _num(r["diff_conf_ci_low"]),
                                             _num(r["diff_conf_ci_high"]), _num(r.get("p_confidence"))]
                runs[r["name"]]["n_pairs"] = int(_num(r.get("n_pairs")) or 0) or None

    def corr(c):
        return {"r": c["pearson_r"], "ci": c.get("pearson_ci"), "p": c["pearson_p"], "n": c["n"]}

    facts = {"baseline": summary.get("paired_baseline"), "runs": runs,
             "rate_conf": corr(summary["correlation_rate_mis_confidence"]),
             "rate_top1": corr(summary["correlation_rate_top1"])}
    classwise = report / "classwise_summary.json"
    if classwise.exists():
        facts["classwise"] = {name: {**corr(s["correlation_accuracy_mis_confidence"]),
                                     "purity": s.get("mean_purity")}
                              for name, s in json.loads(classwise.read_text()).items()}
    compare = report / "compare" / "compare.json"
    if compare.exists():
        c = json.loads(compare.read_text())
        facts["compare"] = {"populations": [
            {"label": p["label"], "conf": p["feature_mean"]["mis_confidence"], "ci": p["feature_mean"]["mis_confidence_ci"],
             "mis": p["feature_mean"]["mis"], "n": p["feature_mean"]["n_units"],
             "n_sparse": p["feature_mean"].get("n_sparse", 0)} for p in c["populations"]],
            "p": c["comparisons"][0]["rank_sum_mis_confidence"]["p"],
            "prob_a_greater": c["comparisons"][0]["rank_sum_mis_confidence"]["prob_a_greater"]}
    return facts


def _ci(low, high) -> str:
    return f"[{low:+.3f}, {high:+.3f}]"


def _p(p) -> str:
    return "-" if p is None else f"{p:.2g}"


def _said(finding) -> list[str]:
    """A report finding as the README's sentence (none where the report has none)."""
    return [f"{finding.question} {finding.sentence}"] if finding is not None else []


def _correlation(c: dict) -> dict:
    """A fact's correlation in the report's (summary.json's) keys."""
    return {"pearson_r": c["r"], "pearson_ci": c.get("ci"), "pearson_p": c.get("p"), "n": c["n"]}


def _paired_rows(runs: dict) -> list[dict]:
    """The facts' paired differences as paired.csv's feature rows."""
    return [{"layer": "features", "name": name, "method": r["method"], "diff_mis_confidence": r["paired"][0],
             "diff_conf_ci_low": r["paired"][1], "diff_conf_ci_high": r["paired"][2], "p_confidence": r["paired"][3],
             "n_pairs": r.get("n_pairs")} for name, r in runs.items() if r.get("paired")]


def _compared(comp: dict) -> dict:
    """The facts' populations compared as compare.json's first comparison."""
    a, b = comp["populations"][:2]
    return {"populations": [{"label": p["label"], "feature_mean": {"mis_confidence": p["conf"],
                                                                   "mis_confidence_ci": p["ci"]}} for p in (a, b)],
            "comparisons": [{"a": a["label"], "b": b["label"], "rank_sum_mis_confidence": {
                "p": comp["p"], "prob_a_greater": comp["prob_a_greater"], "n_a": a["n"], "n_b": b["n"]}}]}


def findings_text(facts: dict) -> str:
    """Sentences for one demo folder's facts; every direction follows a 95 % interval."""
    runs, base = facts["runs"], facts["baseline"]
    out = []
    control = runs.get(base or "", {})
    if control:
        out.append(f"The {base} network (retrained, unpruned) reaches top-1 {control['top1']:.2f} with "
                   f"layer-balanced MIS {control['mis']:.3f} and confidence {control['conf']:.3f}.")
    random = runs.get("random")
    if random and random.get("paired"):
        d, lo, hi, p = random["paired"]
        out.append(f"The untrained network (top-1 {random['top1']:.2f}) scores MIS {random['mis']:.3f} / confidence "
                   f"{random['conf']:.3f}; paired over the same units its confidence is {d:+.3f} {_ci(lo, hi)} "
                   f"(sign-flip p = {_p(p)}) against the {base}: {direction(lo, hi)}.")
    out += _said(paired_finding(_paired_rows(runs), base or "the baseline"))
    pruned = {n: r for n, r in runs.items() if r["rate"] and r.get("paired")}
    chance = {n: r for n, r in pruned.items() if r["top1"] is not None and r["top1"] <= 0.2}
    if chance:
        items = ", ".join(f"{n} {r['paired'][0]:+.3f} {_ci(*r['paired'][1:3])}" for n, r in chance.items())
        out.append(f"Pruned networks at chance accuracy (top-1 at most 0.2), paired confidence against the {base}: "
                   f"{items}.")
    for key, fact in (("correlation_rate_mis_confidence", "rate_conf"), ("correlation_rate_top1", "rate_top1")):
        out += _said(rate_finding({key: _correlation(facts[fact])}, key))
    out += _said(classwise_finding({name: {"correlation_accuracy_mis_confidence": _correlation(c),
                                           "mean_purity": c.get("purity")}
                                    for name, c in facts.get("classwise", {}).items()}, base))
    comp = facts.get("compare")
    if comp:
        out += _said(compare_finding(_compared(comp)))
        b = comp["populations"][1]
        if b.get("n_sparse"):
            out.append(f"{b['n_sparse']} sparse {b['label']} are left out.")
    return " ".join(out)


def spread_text(seeds: dict) -> str:
    """How much the key numbers move across seeds ({seed: facts}), and which directions hold in every seed."""
    n = len(seeds)
    facts = list(seeds.values())
    out = [f"Across {n} seeds ({', '.join(str(s) for s in seeds)}; each seed retrains, prunes and scores anew):"]

    def span(values, fmt):
        values = [v for v in values if v is not None]
        return f"{min(values):{fmt}} to {max(values):{fmt}}" if values else "-"

    base = facts[0]["baseline"]
    controls = [f["runs"].get(base, {}) for f in facts]
    out.append(f"the {base}'s top-1 {span([c.get('top1') for c in controls], '.2f')}, MIS "
               f"{span([c.get('mis') for c in controls], '.3f')}, confidence {span([c.get('conf') for c in controls], '.3f')};")
    randoms = [f["runs"].get("random", {}).get("paired") for f in facts]
    if all(randoms):
        verdicts = [direction(r[1], r[2]) for r in randoms]
        out.append(f"the untrained network's paired confidence difference {span([r[0] for r in randoms], '+.3f')}, "
                   f"lower (interval below 0) in {verdicts.count('lower')} of {n} seeds;")
    for key, what in (("rate_conf", "rate against confidence"), ("rate_top1", "rate against top-1")):
        cs = [f[key] for f in facts if f[key]["r"] is not None]
        sig = sum(1 for c in cs if not c["ci"][0] <= 0 <= c["ci"][1])
        out.append(f"the {what} r {span([c['r'] for c in cs], '+.3f')}, its interval excluding 0 in {sig} of {n};")
    pruned = [[direction(r["paired"][1], r["paired"][2]) for r in f["runs"].values()
               if r["rate"] and r["retrained"] and r.get("paired")] for f in facts]
    out.append("retrained pruned networks lower than the control: "
               f"{', '.join(str(p.count('lower')) for p in pruned)} (higher: "
               f"{', '.join(str(p.count('higher')) for p in pruned)}) per seed;")
    comps = [f.get("compare") for f in facts if f.get("compare")]
    if comps:
        gaps = [c["populations"][0]["conf"] - c["populations"][1]["conf"] for c in comps]
        sig = sum(1 for c in comps if c["p"] is not None and c["p"] < 0.05)
        out.append(f"{comps[0]['populations'][0]['label']} minus {comps[0]['populations'][1]['label']} confidence "
                   f"{span(gaps, '+.3f')}, rank-sum p < 0.05 in {sig} of {len(comps)}.")
    else:
        out[-1] = out[-1].rstrip(";") + "."
    claims = {"the untrained network scores lower than the control":
              [bool(r) and direction(r[1], r[2]) == "lower" for r in randoms],
              "no retrained pruned network scores lower than the control": [p.count("lower") == 0 for p in pruned],
              "pruning rate and MIS confidence show no detectable correlation":
              [f["rate_conf"]["r"] is not None and f["rate_conf"]["ci"][0] <= 0 <= f["rate_conf"]["ci"][1]
               for f in facts]}
    if comps:
        claims["the dictionary's features score below the channels"] = [
            c["p"] is not None and c["p"] < 0.05 and c["populations"][1]["conf"] < c["populations"][0]["conf"]
            for c in comps]
    held = [claim for claim, seen in claims.items() if all(seen)]
    varied = [f"{claim} ({sum(seen)} of {len(seen)})" for claim, seen in claims.items() if not all(seen)]
    out.append("Robust (in every seed): " + ("; ".join(held) if held else "none of the findings above") + "." +
               (" Not robust: " + "; ".join(varied) + "." if varied else ""))
    return " ".join(out)
