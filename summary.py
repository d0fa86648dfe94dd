"""summary.md of an `eval.py run`: the scores by mode (and adapter), inside and outside the ICL
budget, by document, by whether a self-study reply holds the question's fact, the reply most often
repeated, and the general questions' sameness and gates; then the plots (plots.py). Reads records, runs no model."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import study
import plots
from benchmarks import contains, normalize, read_benchmark
from data import DataConfig


OPENING = 5    # words: enough to tell one licence sentence from another, few enough to ignore how it ends


def most_repeated_opening(replies: list[str]) -> tuple[str, int, int]:
    """The opening (first OPENING words, case and spacing ignored) that most replies share, how many
    share it, and how many different openings there are."""
    counts = Counter(" ".join(r.lower().split()[:OPENING]) for r in replies)
    top, n = counts.most_common(1)[0] if counts else ("", 0)
    return top, n, len(counts)


RESTATED = 3   # words: a reply whose first three stand in a row in its question begins by restating it


def restates(reply: str, question: str) -> bool:
    """Does `reply` begin with RESTATED words of `question` in a row (case, punctuation and articles
    ignored)? The base model answers so ("The copyright license granted in Section 2 … is
    irrevocable."); an adapter that recites a studied clause does not."""
    first, asked = normalize(reply).split()[:RESTATED], normalize(question).split()
    return len(first) == RESTATED and any(asked[i:i + RESTATED] == first for i in range(len(asked)))


def openings_table(groups: dict[str, list[dict]]) -> list[str]:
    """Markdown lines: by mode, the opening most answers share, and how many answers begin by
    restating their question. An adapter that has collapsed onto a few recited sentences gives many
    questions the same one, whatever they ask."""
    if not any("prediction" in r for rs in groups.values() for r in rs):
        return []
    lines = ["", f"The most repeated reply: how many answers begin with the same {OPENING} words (a recited "
                 "sentence the adapter falls back on), how many different openings there are, and how many "
                 f"answers begin with {RESTATED} words of their question in a row", "",
             "| mode (adapter) | most repeated opening | answers | different openings | restate the question |",
             "|---|---|---:|---:|---:|"]
    for name, rs in groups.items():
        top, n, distinct = most_repeated_opening([r.get("prediction", "") for r in rs])
        said = sum(restates(r.get("prediction", ""), r.get("question", "")) for r in rs)
        lines.append(f"| {name} | {top.replace('|', '/')} | {n}/{len(rs)} | {distinct} | {said}/{len(rs)} |")
    return lines


RECITED = 6    # words: a reply whose first six stand in the document word for word is reciting it
PASSAGE = 80   # words: how far on from the recital's start the question's answer may stand


def recital(reply: str, document: str, answers: list[str]) -> str:
    """Is a reply the document recited, and from the right place? "none": its first RECITED words are
    not in the document (case, punctuation and articles ignored); "right": the document holds an
    answer within PASSAGE words of a place where the reply starts; "wrong": it recites another place.
    Many "wrong" mean the adapter knows the text but not which part a question is about."""
    start = " ".join(normalize(reply).split()[:RECITED])
    words = normalize(document).split()
    places = [i for i in range(len(words)) if " ".join(words[i:i + RECITED]) == start] if start else []
    if not places:
        return "none"
    near = lambda i: f" {' '.join(words[i:i + PASSAGE])} "
    return "right" if any(f" {normalize(a)} " in near(i) for i in places for a in answers if normalize(a)) else "wrong"


def recital_table(groups: dict[str, list[dict]], documents: dict[str, str]) -> list[str]:
    """Markdown lines: by mode, over the questions whose evidence is outside the budget, how many
    replies recite the document, how many of those from the right place, and how many hold an answer."""
    lines = ["", f"Replies that recite the document (their first {RECITED} words in it), questions outside the budget",
             "", "| mode (adapter) | asked | recite the document | from the answer's place (within "
             f"{PASSAGE} words) | contain an answer |", "|---|---:|---:|---:|---:|"]
    for name, rs in groups.items():
        outside = [r for r in rs if r.get("in_budget") is False and r["doc"] in documents]
        kinds = Counter(recital(r["prediction"], documents[r["doc"]], r["answers"]) for r in outside)
        lines.append(f"| {name} | {len(outside)} | {kinds['right'] + kinds['wrong']} | {kinds['right']} | "
                     f"{sum(bool(r['contains']) for r in outside)} |")
    return lines


def address_table(groups: dict[str, list[dict]], absorbed: list[dict], bench: dict[str, dict],
                  cfg: DataConfig) -> list[str]:
    """Markdown lines: over questions outside the budget whose evidence lies in a sentence the self-study
    quoted, how often the adapter recites that sentence whole when asked in the study's own wordings
    (eval.py's recall check, absorb.jsonl), and how often it answers the user's question, also when
    the question holds one of the very keys the sentence was studied under. A fact recited in the
    studied wording but missed in the user's is stored and not reached: an address the user's words
    do not give. The study's questions are read from absorb.jsonl when it lists them; runs made
    before it did get them rebuilt, and keys of equal rarity were then chosen in an order that
    changed from process to process (study.keys), so a few of their keys may differ."""
    flat, found = lambda t: " ".join(t.split()), {}
    for doc in sorted({r["doc"] for rs in groups.values() for r in rs} & set(bench)) if cfg.distill else ():
        text, record = bench[doc]["document"], next((a for a in absorbed if a["doc"] == doc), {})
        missed = record.get("study_missed")
        asked = missed + record["study_recalled"] if "study_recalled" in record else \
            [q for q, _, _ in study.study_pairs(text, cfg)]
        where = lambda q: flat(study.key_sentence(study.asked_key(q) or "", text) or "")   # the sentence asked for
        found[doc] = ([(key, where(q)) for q in asked if (key := study.asked_key(q))],
                      None if missed is None else [where(q) for q in missed])
    if not found:
        return []
    lines = ["", "The address gap: questions outside the budget whose evidence lies in a sentence the self-study "
                 "quoted: recited in the study's wordings (the recall check), answered in the user's (lift+studied: "
                 "asked in the study's wording too)", "",
             "| mode (adapter) | asked | the study's wording recites the sentence whole | the question holds its key "
             "| answered | of those, holding the key |", "|---|---:|---:|---:|---:|---:|"]
    for name, rs in groups.items():
        if rs[0]["adapter"] == "none":
            continue
        row = Counter()
        for r in (r for r in rs if r.get("in_budget") is False and r["doc"] in found):
            studied, missed = found[r["doc"]]               # missed: None when the run did not check recall
            q = bench[r["doc"]]["questions"][r["q"]]
            ev = study.evidence(q)
            keys = [k for k, sentence in studied if ev in sentence]
            if not keys:
                continue
            held = any(f" {normalize(k)} " in f" {normalize(q['question'])} " for k in keys)
            row.update(asked=1, held=held, answered=bool(r["contains"]), both=held and bool(r["contains"]),
                       recited=missed is not None and len(keys) > sum(ev in sentence for sentence in missed))
        recited = row["recited"] if all(m is not None for _, m in found.values()) else "–"   # no recall check run
        lines.append(f"| {name} | {row['asked']} | {recited} | {row['held']} | {row['answered']} | {row['both']} |")
    return lines


def label(r: dict) -> str:
    return r["mode"] if r["adapter"] == "none" else f"{r['mode']} ({r['adapter']})"


def write_summary(records: list[dict], out: Path, settings: dict, reached: dict | None = None) -> str:
    """summary.md (a table by mode, and by evidence inside/outside the ICL budget) and the plots.
    reached: (doc, question) → whether a self-study reply holds the question's fact, its answer within the
    answer's budget of tokens (--distill)."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(label(r), []).append(r)
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs) if rs else float("nan")
    lines = [f"Settings: `{json.dumps(settings)}`", "",
             "| mode (adapter) | n | contained | exact match | token F1 | contained, evidence outside budget | contained, evidence inside |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, rs in groups.items():
        outside = [r for r in rs if r.get("in_budget") is False]
        inside = [r for r in rs if r.get("in_budget") is True]
        lines.append(f"| {name} | {len(rs)} | {mean(rs, 'contains'):.2f} | {mean(rs, 'em'):.2f} | {mean(rs, 'f1'):.2f} | "
                     f"{mean(outside, 'contains'):.2f} ({len(outside)}) | {mean(inside, 'contains'):.2f} ({len(inside)}) |")
    docs = sorted({r["doc"] for r in records})
    if len(docs) > 1:                  # how the counts split over the documents: answered/asked

        def count(rs: list[dict], inside: bool) -> str:
            asked = [r for r in rs if r.get("in_budget") is inside]
            return f"{sum(bool(r['contains']) for r in asked)}/{len(asked)}"
        lines += ["", "Contained, by document: outside · inside the budget", "",
                  "| mode (adapter) | " + " | ".join(docs) + " |", "|---|" + "---:|" * len(docs)]
        for name, rs in groups.items():
            by_doc = [[r for r in rs if r["doc"] == d] for d in docs]
            lines.append(f"| {name} | " + " | ".join(f"{count(d, False)} · {count(d, True)}" for d in by_doc) + " |")
    if reached:                        # did the adapter answer what it studied, and anything else?
        covered = sorted({d for d, _ in reached})      # a rerun with fewer --docs knows only those documents' sets
        only = f" (documents {', '.join(covered)} only)" if set(docs) - set(covered) else ""
        lines += ["", f"Contained, as answered/asked: questions whose fact a self-study reply holds (its answer within the reply's first tokens, as many as an answer may have), and the rest{only}", "",
                  "| mode (adapter) | studied | not studied |", "|---|---:|---:|"]
        for name, rs in groups.items():
            split = [[r for r in rs if reached.get((r["doc"], r["q"])) is s] for s in (True, False)]
            lines.append(f"| {name} | " + " | ".join(f"{sum(bool(r['contains']) for r in g)}/{len(g)}" for g in split) + " |")
    lines += openings_table(groups)
    absorbed = [json.loads(l) for l in (out / "absorb.jsonl").open()] if (out / "absorb.jsonl").exists() else []
    if any("general_same_lift" in a for a in absorbed):
        lines += ["", "| adapter | doc | same answer as base: lift / lift+icl | general contained: lift / lift+icl "
                      "| mean gate: document questions / general | memory's share of the output: document / general |",
                  "|---|---|---:|---:|---:|---:|"]
        pair = lambda a, k: f"{a[k + '_document']:.3f} / {a[k + '_general']:.3f}" if k + "_document" in a else "–"
        for a in (a for a in absorbed if "general_same_lift" in a):
            lines.append(f"| {a['adapter']} | {a['doc']} | {a['general_same_lift']:.2f} / {a['general_same_lift+icl']:.2f} "
                         f"| {a['general_contained_lift']:.2f} / {a['general_contained_lift+icl']:.2f} "
                         f"| {pair(a, 'gate')} | {pair(a, 'share')} |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text)
    plots.plot_results(groups, out)
    return text


def context_effect(rs: list[dict]) -> tuple[int, int, int] | None:
    """Outside the budget, what the document's opening in context does to what the adapter recalls
    from its parameters: of the questions LIFT alone answers, how many LIFT+ICL still answers (kept)
    and how many it loses; and how many LIFT+ICL answers that LIFT alone does not (gained). Only the
    adapter's own replies count: not a question --switch answered with the adapter off (the base's
    reply, or ICL's), and not one that holds its own reference answer, which a reply restating the
    question gets right (Apache's "…so that it is not a Contribution?"). None if the run did not
    answer both modes."""
    hits: dict = {}
    for r in rs:
        if r["mode"] not in ("lift", "lift+icl") or r.get("in_budget") is not False:
            continue
        own = (r.get("switch") or {}).get("adapter_used", True) and not contains(r["question"], r["answers"])
        hits.setdefault((r.get("doc"), r["question"], r["adapter"]), {})[r["mode"]] = bool(r["contains"]) if own else None
    both = [h for h in hits.values() if len(h) == 2]
    if not both:
        return None
    pairs = [(h["lift"], h["lift+icl"]) for h in both if None not in h.values()]
    return (sum(a and b for a, b in pairs), sum(a and not b for a, b in pairs), sum(b and not a for a, b in pairs))


def runs_table(runs: dict[str, list[dict]], absorbed: dict[str, list[dict]]) -> list[str]:
    """Markdown lines: one row per finished run (its records and absorb lines), answered/asked outside
    · inside the budget by mode, what the document in context does to LIFT's answers (context_effect),
    the gate on document questions over general ones, how often the general questions get the base's
    reply, and the sums over the runs: whether a result holds over seeds, not on one."""
    modes = list(dict.fromkeys(label(r) for rs in runs.values() for r in rs))
    count = lambda rs, inside: (sum(bool(r["contains"]) for r in rs if r.get("in_budget") is inside),
                                sum(r.get("in_budget") is inside for r in rs))
    cell = lambda o, i: f"{o[0]}/{o[1]} · {i[0]}/{i[1]}"
    effect = lambda e: "–" if e is None else f"{e[0]} · {e[1]} · {e[2]}"
    lines = ["", "Over the runs: answered/asked, outside · inside the budget; and outside, LIFT alone's right "
                 "answers kept · lost with the document's opening in context (LIFT+ICL), and answers gained (the adapter's "
                 "own replies, not a question that holds its answer)", "",
             "| run | " + " | ".join(modes) + " | lift → lift+icl: kept · lost · gained "
             "| gate, document / general | general replies the base's, lift / lift+icl |",
             "|---|" + "---:|" * (len(modes) + 3)]
    total = {m: [0, 0, 0, 0] for m in modes}
    moved = None
    for name, rs in runs.items():
        cells = []
        for m in modes:
            o, i = count([r for r in rs if label(r) == m], False), count([r for r in rs if label(r) == m], True)
            total[m] = [a + b for a, b in zip(total[m], o + i)]
            cells.append(cell(o, i))
        e = context_effect(rs)
        if e is not None:
            moved = e if moved is None else tuple(a + b for a, b in zip(moved, e))
        ours = absorbed.get(name, [])
        gates = ", ".join(f"{a['gate_document'] / a['gate_general']:.2f}×"
                          + (f" (share {a['share_document'] / a['share_general']:.2f}×)" if a.get("share_general") else "")
                          for a in ours if a.get("gate_general"))
        same = ", ".join(f"{a['general_same_lift']:.2f} / {a['general_same_lift+icl']:.2f}"
                         for a in ours if "general_same_lift" in a)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {effect(e)} | {gates or '–'} | {same or '–'} |")
    lines.append("| **all** | " + " | ".join(cell(t[:2], t[2:]) for t in total.values()) + f" | {effect(moved)} | | |")
    return lines


def run_settings(folder: Path) -> DataConfig:
    """The data settings a finished run was made with: the first line of its summary.md."""
    line = (folder / "summary.md").open().readline() if (folder / "summary.md").is_file() else ""
    return DataConfig(**json.loads(line.split("`")[1])["data"]) if line.startswith("Settings: `") else DataConfig()


if __name__ == "__main__":    # python summary.py [--bench FILE] RUN_FOLDER...: tables over finished runs
    import argparse
    cli = argparse.ArgumentParser(description="The repeated-reply table of finished `eval.py run` folders, and with "
                                              "--bench the recital table (which replies recite the document, from "
                                              "where) and the address gap (a studied sentence recited in the study's "
                                              "wording, missed in the user's); with several folders, their counts side by side and summed")
    cli.add_argument("folders", nargs="+")
    cli.add_argument("--bench", help="the benchmark the runs answered (its documents' text)")
    args = cli.parse_args()
    bench = {d["id"]: d for d in read_benchmark(args.bench)} if args.bench else {}
    documents = {i: d["document"] for i, d in bench.items()}
    runs, absorbs = {}, {}
    for folder in map(Path, args.folders):
        if not (folder / "records.jsonl").is_file():
            cli.error(f"{folder}: no records.jsonl (not a finished `eval.py run` folder)")
        groups: dict[str, list[dict]] = {}
        runs[folder.name] = [json.loads(line) for line in (folder / "records.jsonl").open()]
        for r in runs[folder.name]:
            groups.setdefault(label(r), []).append(r)
        absorbs[folder.name] = absorbed = [json.loads(l) for l in (folder / "absorb.jsonl").open()] \
            if (folder / "absorb.jsonl").exists() else []
        tables = openings_table(groups) + (recital_table(groups, documents) if documents else []) + \
            (address_table(groups, absorbed, bench, run_settings(folder)) if bench else [])
        print(f"## {folder}\n" + "\n".join(tables) + "\n")
    if len(runs) > 1:
        print("\n".join(runs_table(runs, absorbs)))
