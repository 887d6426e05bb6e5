"""Phase 1 of curate.py, in Ray tasks: a read unit's documents through the per-document stages
in recipe order (each document stops at the first that removes it), with what each dedup stage
needs of the text as it stands at that stage: a normalized digest (exact) or a MinHash
signature (near). One Arrow table per unit, rows in input order.

A document's key is (unit index << 32 | index in the unit): sorting by key is input order.
"""

from __future__ import annotations

import json
from collections import defaultdict

from data_tools.curate_lib import recipe as rcp
from data_tools.curate_lib.filters import FILTERS
from data_tools.curate_lib.minhash import permutations, shingles, signature
from data_tools.curate_lib.reader import UnitError, unit_documents
from data_tools.shard_lib.clean import normalized_digest


def bad_record_message(bad: dict) -> str:
    if "row" in bad:
        where = f"{bad['path']}: row {bad['row']}"
    else:
        line = bad["line"]
        if bad.get("start"):  # a byte range of a large file: count the lines before it
            with open(bad["path"], "rb") as f:
                line += f.read(bad["start"]).count(b"\n")
        where = f"{bad['path']}:{line}"
    fix = ("pass --text-key with the field that holds the text" if bad["reason"] == "missing_text_key"
           else "fix or remove the record")
    return f"{where}: {bad['detail']}; {fix}"


def _unit_schema(dedup: list[int]):
    import pyarrow as pa

    return pa.schema([("key", pa.int64()), ("path", pa.string()), ("id", pa.string()),
                      ("text", pa.large_string()), ("nbytes", pa.int64()),
                      ("drop_stage", pa.int16()), ("reason", pa.string()),
                      ("cut", pa.string()), ("error", pa.string())]
                     + [(f"feature_{s}", pa.binary()) for s in dedup])


def process_units(batch, stages: list[dict], resources: dict, text_key: str):
    """Ray map_batches UDF: read units (JSON) -> one table of their documents each."""
    import pyarrow as pa

    built = {}
    for s, spec in enumerate(stages, start=1):
        if spec["name"] in FILTERS:
            built[s] = FILTERS[spec["name"]](spec["params"], resources.get(s))
        elif spec["name"] == "near_dedup":
            p = spec["params"]
            built[s] = (p["ngram"], permutations(p["num_perm"], p["seed"]))
    dedup = [s for s, spec in enumerate(stages, start=1) if spec["name"] in rcp.DEDUP_STAGES]
    schema = _unit_schema(dedup)
    for unit_json in batch.column("unit").to_pylist():
        unit = json.loads(unit_json)
        rows = defaultdict(list)
        try:
            for i, (path, data, id_json, reject) in enumerate(unit_documents(unit, text_key)):
                text = data.decode("utf-8")
                drop, reason, cuts = (0, reject, {}) if reject else (-1, "", {})
                features = dict.fromkeys(dedup)
                for s, spec in enumerate(stages, start=1):
                    if drop >= 0:
                        break
                    if spec["name"] == "exact_dedup":
                        features[s] = normalized_digest([text.encode("utf-8")])
                    elif spec["name"] == "near_dedup":
                        ngram, seeds = built[s]
                        sig = signature(shingles(text, ngram), seeds)
                        features[s] = None if sig is None else sig.tobytes()
                    else:
                        text, why, cut = built[s].apply(text)
                        if why:
                            drop, reason = s, why
                        elif cut:
                            cuts[s] = dict(cut)
                rows["key"].append((unit["index"] << 32) | i)
                rows["path"].append(path)
                rows["id"].append(id_json)
                rows["text"].append(text)
                rows["nbytes"].append(len(data))
                rows["drop_stage"].append(drop)
                rows["reason"].append(reason)
                rows["cut"].append(json.dumps(cuts) if cuts else "")
                rows["error"].append("")
                for s in dedup:
                    rows[f"feature_{s}"].append(features[s])
        except UnitError as err:
            message = bad_record_message(err.bad) if err.bad else str(err)
            rows = {name: [None] for name in schema.names}
            rows.update(key=[-1], error=[message], drop_stage=[-1], nbytes=[0])
        if not rows:
            continue
        yield pa.table({name: rows[name] for name in schema.names}, schema=schema)


