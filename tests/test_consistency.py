"""One number, one source: a real sweep's figures, table.md, summary.json and claims.md give the same interval for the
same quantity and the same probability in the same direction; the committed pages quote their artefacts exactly."""

import dataclasses
import json
import math
import re
import sys

import pytest
from conftest import ROOT, run_script

import analyze

sys.path.insert(0, str(ROOT / "benchmarks"))

# ----------------------------------------------------------------------------------------------------------------
# Quotes: a number a page quotes from an artefact is written  <!--q ARTEFACT KEY-->0.253 ± 0.032<!--/q-->  (the
# comments do not render). ARTEFACT: a JSON file, relative to the repository; KEY: a dotted path into it, where a
# segment is a key, a list index, or [field=value,...] picking the one list entry with those fields; it may end in
# {a,b} (several keys of one entry, in order) and in |mean_se (a list of per-seed values -> mean, standard error); a
# string value stands for the numbers written in it. Every number inside the span must equal the artefact's value
# at the digits shown.
# ----------------------------------------------------------------------------------------------------------------

PAGES = ("README.md", "docs/results.md", "docs/parity.md", "docs/analysis.md")
QUOTE = re.compile(r"<!--q (\S+) (.+?)-->(.*?)<!--/q-->", re.S)
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


class Mismatch(AssertionError):
    pass


@dataclasses.dataclass
class Quote:
    page: str
    artefact: str
    key: str
    text: str


def _resolve(value, key: str):
    reducer = None
    if "|" in key:
        key, reducer = key.split("|")
    tail = None
    if key.endswith("}"):
        key, _, tail = key[:-1].rpartition("{")
        key = key.rstrip(".")
    for segment in re.findall(r"\[[^\]]*\]|[^.\[\]]+", key):
        if segment.startswith("["):
            wanted = dict(pair.split("=", 1) for pair in segment[1:-1].split(","))
            [value] = [v for v in value if all(str(v.get(k)) == w for k, w in wanted.items())]
        elif isinstance(value, list):
            value = value[int(segment)]
        else:
            value = value[segment]
    values = [value[k] for k in tail.split(",")] if tail else [value]
    if reducer == "mean_se":
        [seeds] = values
        mean = sum(seeds) / len(seeds)
        values = [mean, math.sqrt(sum((x - mean) ** 2 for x in seeds) / (len(seeds) - 1) / len(seeds))]
    flat = []
    for v in values:  # a string (claims' "evidence") stands for the numbers written in it
        flat += v if isinstance(v, list) else [float(x) for x in NUMBER.findall(v)] if isinstance(v, str) else [v]
    return flat


def check(root) -> list[Quote]:
    """Every quote of every page in PAGES against its artefact; raises Mismatch naming the page and the quote."""
    quotes = []
    for page in PAGES:
        for artefact, key, text in QUOTE.findall((root / page).read_text()):
            quote = Quote(page, artefact, key, text)
            try:
                expected = _resolve(json.loads((root / artefact).read_text()), key)
            except (OSError, KeyError, IndexError, ValueError, TypeError) as error:
                raise Mismatch(f"{page}: {artefact} {key}: not found ({error!r})") from error
            shown = NUMBER.findall(text)
            if len(shown) != len(expected):
                raise Mismatch(f"{page}: '{text}' shows {len(shown)} numbers, {artefact} {key} has {len(expected)}")
            for number, value in zip(shown, expected):
                digits = len(number.partition(".")[2])
                if value is None or abs(float(number) - value) > 0.5 * 10 ** -digits + 1e-9:
                    raise Mismatch(f"{page}: '{text}' quotes {number}, {artefact} {key} holds {value}")
            quotes.append(quote)
    return quotes


def _interval_text(mean: float, ci: list, digits: int) -> str:
    return f"{mean:.{digits}f}\n[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def test_a_real_sweep_says_the_same_thing_in_every_artefact(data_dir, tmp_path, monkeypatch):
    # walker: returns differ from seed to seed after 100 steps (a tiny pointmaze run's success is 0 everywhere)
    sweep, env = tmp_path / "sweep", "walker-run-random"
    proc = run_script("scaling.py", "--envs", env, "--scripts", "iql_awr", "iql_ddpgbc", "--value-sizes", "80",
                      "--policy-sizes", "40", "80", "--seeds", "0", "1", "2", "--steps", "100", "--pack", "6",
                      "--workers", "2", "--dataset-dir", str(data_dir), "--sweep-dir", str(sweep), "--no-progress",
                      "--", "--log-interval", "50", "--eval-interval", "100", "--hidden-dims", "16", "--batch-size",
                      "32", "--eval-episodes", "1", "--eval-max-steps", "100")
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = {}
    save = analyze.save_figure
    monkeypatch.setattr(analyze, "save_figure", lambda fig, out, stem, formats: figures.setdefault(stem, fig) and
                        save(fig, out, stem, formats))
    analyze.main(analyze.Args(str(sweep), format=("png",)))
    out = sweep / "analysis"
    summary = json.loads((out / "summary.json").read_text())
    table_md, claims_md = (out / "table.md").read_text(), (out / "claims.md").read_text()

    # a cell: summary.json's cells[] and matrices[] and the matrix figure give one interval
    matrix_axes = {ax.get_title(): ax for ax in figures[f"matrices_{env}"].axes if ax.get_title()}
    checked = 0
    for m in summary["matrices"]:
        if m["script"] == "bc":
            continue
        texts = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text()
                 for t in matrix_axes[analyze.script_label(m["script"])].texts}
        for i, v in enumerate(m["value_sizes"]):
            for j, p in enumerate(m["policy_sizes"]):
                [cell] = [c for c in summary["cells"] if (c["script"], c["value_data_size"], c["policy_data_size"],
                                                          c["alpha"]) == (m["script"], v, p, m["alpha"][i][j])]
                assert cell["return"]["mean_ci"] == m["mean_ci"][i][j] and cell["return"]["iqm"] == m["iqm"][i][j]
                assert cell["return"]["mean"] == m["mean"][i][j] and m["mean_ci"][i][j][0] < m["mean_ci"][i][j][1]
                assert texts[(j, i)].startswith(_interval_text(m["mean"][i][j], m["mean_ci"][i][j], 1))
                checked += 1
    assert checked == 4

    # the matrix averages: table.md's mean table, summary.json's table and the aggregate figure's bars
    [row] = [r for r in summary["table"] if r["kind"] == "final"]
    aggregate = figures[f"aggregate_{env}"]
    bars = {c.get_label(): c for c in aggregate.axes[0].containers if hasattr(c, "patches")}
    for extractor in ("awr", "ddpgbc"):
        a = row[extractor]
        assert analyze._with_interval(a, "return") in table_md
        [bar] = bars[analyze.NAMES[extractor]].patches
        assert bar.get_height() == pytest.approx(a["mean"], abs=1e-12)
        [segment] = bars[analyze.NAMES[extractor]].errorbar.lines[2][0].get_segments()
        assert [segment[0][1], segment[1][1]] == pytest.approx(a["mean_ci"], abs=1e-12)
    best = row["best_extractor"]
    assert best in ("awr", "ddpgbc", "tie")
    margin = row["best_margin"]  # the top mean minus the runner-up's, with its interval: "tie" unless above zero
    assert (best == "tie") == (margin["ci"][0] <= 0)
    for extractor in ("awr", "ddpgbc"):
        bold = f"**{analyze._with_interval(row[extractor], 'return')}**" in table_md
        assert bold == (extractor == best)

    # the probability of improvement: one direction (DDPG+BC > AWR) in summary.json, table.md, the figure, claims.md
    [poi] = summary["improvement"]
    assert (poi["x"], poi["y"]) == ("ddpgbc", "awr")
    text = f"{poi['poi']:.2f} [{poi['poi_ci'][0]:.2f}, {poi['poi_ci'][1]:.2f}]"
    assert f"| {env} | iql | DDPG+BC | AWR | {text} | 2 |" in table_md
    assert f"P(DDPG+BC > AWR) = {text} over 2 cells" in claims_md
    axis = aggregate.axes[1]
    assert [t.get_text() for t in axis.get_yticklabels()] == ["IQL: DDPG+BC > AWR"]
    [dots] = [c for c in axis.containers]
    assert dots.lines[0].get_xdata()[0] == pytest.approx(poi["poi"], abs=1e-12)
    [segment] = dots.lines[2][0].get_segments()
    assert [segment[0][0], segment[1][0]] == pytest.approx(poi["poi_ci"], abs=1e-12)

    # every claim names its own rule
    for claim in {r["claim"] for r in summary["claims"]}:
        assert analyze.CLAIM_RULES[claim] in claims_md


def test_committed_pages_quote_their_artefacts():
    quotes = check(ROOT)
    assert len(quotes) >= 20, "the pages lost their quotes"
    assert {q.page for q in quotes} == set(PAGES)


def test_a_number_changed_by_hand_is_caught(tmp_path):
    import shutil

    for page in PAGES:
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / page, tmp_path / page)
    for artefact in {q.artefact for q in check(ROOT)}:
        (tmp_path / artefact).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / artefact, tmp_path / artefact)
    assert check(tmp_path)
    caught = 0
    for page in PAGES:
        text = (tmp_path / page).read_text()
        match = re.search(r"(<!--q [^>]*-->[^<]*?)(\d)(?=[^<]*<!--/q-->)", text)
        if not match:
            continue
        digit = str((int(match.group(2)) + 1) % 10)
        (tmp_path / page).write_text(text[:match.start(2)] + digit + text[match.end(2):])
        with pytest.raises(Mismatch, match=re.escape(page)):
            check(tmp_path)
        (tmp_path / page).write_text(text)
        caught += 1
    assert caught == len(PAGES)


def test_parity_md_holds_the_table_parity_py_writes():
    """docs/parity.md's summary table is benchmarks/parity.py's, from the committed docs/parity/*.json, unedited."""
    import parity

    text = (ROOT / "docs" / "parity.md").read_text()
    block = text.split(parity.SUMMARY_BEGIN)[1].split(parity.SUMMARY_END)[0].strip()
    reports = sorted((ROOT / "docs" / "parity").glob("*.json"))
    assert len(reports) >= 3 and block == parity.summary_table(reports)
