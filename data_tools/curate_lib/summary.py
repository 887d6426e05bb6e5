"""What happened to every document, decided on the driver from phase 1's small per-document
columns and the dedup stages' removals; and the manifest and report that record it.

Stage 0 is 'read' (empty and binary documents); recipe stage i is stage i + 1. A document's
fate is the first stage that removed it: a per-document stage's own verdict, or a dedup
stage's (which only ever saw documents that no earlier stage had removed).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from data_tools.curate_lib import recipe as rcp

READ_STAGE = "read"
EXAMPLES = 3  # per stage and reason in report.json
SNIPPET_CHARS = 300
DEDUP_REASONS = {"exact_dedup": "duplicate", "near_dedup": "near_duplicate"}


@dataclass
class Decisions:
    names: list[str]  # stage names, 'read' first
    kept: np.ndarray  # bool per input position
    nbytes: np.ndarray  # input text bytes per position
    # position -> (stage, reason, position of the document kept in its place or -1)
    removed: dict[int, tuple[int, str, int]]
    counts: dict[int, Counter]  # stage -> reason -> documents
    byte_counts: dict[int, Counter]  # stage -> reason -> input text bytes
    trimmed: dict[int, Counter]  # stage -> line rule -> bytes cut from kept lines' documents
    examples: dict[tuple[int, str], list[int]]  # (stage, reason) -> first positions

    def wanted(self) -> set[int]:
        """Positions whose text the report shows: examples and the documents kept in their place."""
        shown = {i for group in self.examples.values() for i in group}
        return shown | {self.removed[i][2] for i in shown if self.removed[i][2] >= 0}


def decide(stages: list[rcp.Stage], keys: np.ndarray, nbytes: np.ndarray, drop: np.ndarray,
           reasons: list[str], cuts: list[str], removed_by: dict[int, tuple[int, int]]) -> Decisions:
    names = [READ_STAGE] + [s.name for s in stages]
    final = drop.astype(np.int64)
    final[final < 0] = len(names)  # not removed by a per-document stage
    kept_for = {}
    if removed_by:
        # keys are sorted (input order): a key's position is where searchsorted finds it
        gone = np.fromiter(removed_by, dtype=np.int64, count=len(removed_by))
        stage_kept = np.array(list(removed_by.values()), dtype=np.int64)  # (n, 2)
        at, kept_at = np.searchsorted(keys, gone), np.searchsorted(keys, stage_kept[:, 1])
        for i, s, kept in zip(at.tolist(), stage_kept[:, 0].tolist(), kept_at.tolist()):
            if s < final[i]:
                final[i] = s
                kept_for[i] = kept
    counts = {s: Counter() for s in range(len(names))}
    byte_counts = {s: Counter() for s in range(len(names))}
    removed = {}
    examples = defaultdict(list)
    for i in np.flatnonzero(final < len(names)).tolist():  # in input order
        s = int(final[i])
        reason = DEDUP_REASONS[names[s]] if i in kept_for else reasons[i]
        removed[i] = (s, reason, kept_for.get(i, -1))
        counts[s][reason] += 1
        byte_counts[s][reason] += int(nbytes[i])
        if len(examples[(s, reason)]) < EXAMPLES:
            examples[(s, reason)].append(i)
    trimmed = {s: Counter() for s in range(len(names))}
    for i, cut in enumerate(cuts):
        if cut:
            for s, rules in json.loads(cut).items():
                if int(s) < final[i]:  # lines cut from a document that got past that stage
                    trimmed[int(s)].update(rules)
    return Decisions(names, final == len(names), nbytes, removed, counts, byte_counts, trimmed,
                     dict(examples))


def snippet(position: int, path: str, id_json: str, text: str) -> dict:
    return {"position": position, "path": path, **({"id": json.loads(id_json)} if id_json else {}),
            "text": text[:SNIPPET_CHARS]}


def manifest_and_report(d: Decisions, stages: list[rcp.Stage], settings: dict, inputs: list,
                        shards: list[dict], snippets: dict[int, dict]) -> tuple[dict, dict]:
    described = rcp.describe(stages)
    records = []
    for s, name in enumerate(d.names):
        record = {"name": name, "params": {} if s == 0 else described[s - 1][name],
                  "removed": {r: {"documents": d.counts[s][r], "bytes": d.byte_counts[s][r]}
                              for r in sorted(d.counts[s])}}
        if d.trimmed[s]:
            record["trimmed_bytes"] = dict(sorted(d.trimmed[s].items()))
        records.append(record)
    read, kept = len(d.kept), int(d.kept.sum())
    documents = {"read": read, "kept": kept, "removed": read - kept}
    text_bytes = {"read": int(d.nbytes.sum()), "kept": int(d.nbytes[d.kept].sum())}
    manifest = {"format": "pretrain-curated", "format_version": 1, "documents": documents,
                "text_bytes": text_bytes, "recipe": described, "stages": records,
                "settings": settings, "inputs": inputs, "shards": shards}
    report_stages = []
    for s, record in enumerate(records):
        reasons = {}
        for reason, numbers in record["removed"].items():
            shown = []
            for i in d.examples.get((s, reason), []):
                example = dict(snippets[i])
                if d.removed[i][2] >= 0:
                    example["kept"] = snippets[d.removed[i][2]]
                shown.append(example)
            reasons[reason] = {**numbers, "examples": shown}
        report_stages.append({**record, "removed": reasons})
    report = {"format": "pretrain-curation-report", "documents": documents,
              "text_bytes": text_bytes, "stages": report_stages}
    return manifest, report
