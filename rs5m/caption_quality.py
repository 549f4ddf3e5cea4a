"""How good the model captions of the last captioning run look, per source and overall, from the rs3_caption
shards through the DuckDB catalog: for `rs5m report` (text and JSON) and the `rs5m-caption-quality`
Prefect artifact.

Measured on the chosen model caption of each image (top_cap or ssl_cap, before the meta caption is put in
front): how many images; the share of images whose caption repeats one another image of the group got
(duplicates: 1 - distinct captions / images);
length in words (mean, 10th/50th/90th percentile, max); the share naming an orientation or side (the
ORIENTATION pattern of tasks/rs3_caption.py), also over the top-five candidates; the mean CLIP score of
the chosen captions (mean over the rotations) and of top_cap and ssl_cap; how often they are the same
caption; and the first three images by sample id as examples.
"""

from __future__ import annotations

from typing import Any

import duckdb

from storage.catalog import COMPLETE, open_catalog
from tasks.rs3_caption import ORIENTATION

STAGE = "rs3_caption"
EXAMPLES = 3
ALL_SOURCES = "(all)"

_METRICS = """
    count(*) AS images,
    1 - count(DISTINCT chosen) / count(*) AS duplicate_share,
    avg(words) AS words_mean,
    quantile_disc(words, 0.1) AS words_p10,
    quantile_disc(words, 0.5) AS words_p50,
    quantile_disc(words, 0.9) AS words_p90,
    max(words) AS words_max,
    avg(oriented::INT) AS orientation_share,
    sum(candidates_oriented) / sum(candidates) AS candidate_orientation_share,
    avg(caption_score) AS caption_score_mean,
    avg(top_cap_score) AS top_cap_score_mean,
    avg(ssl_cap_score) AS ssl_cap_score_mean,
    avg((top_cap = ssl_cap)::INT) AS top_equals_ssl_share,
    avg((caption_choice = 'ssl_cap')::INT) AS ssl_chosen_share
"""


# the chosen model caption of every row, with what the metrics need ($pattern: ORIENTATION)
_CHOSEN = f"""WITH chosen AS (SELECT
    source, sample_id, file, caption, caption_choice, caption_score, top_cap, top_cap_score,
    ssl_cap, ssl_cap_score,
    CASE caption_choice WHEN 'top_cap' THEN top_cap ELSE ssl_cap END AS chosen,
    len(regexp_split_to_array(trim(chosen), '\\s+')) AS words,
    regexp_matches(chosen, $pattern, 'i') AS oriented,
    len(caption_candidates) AS candidates,
    len(list_filter(caption_candidates, lambda c: regexp_matches(c.text, $pattern, 'i'))) AS candidates_oriented
FROM "{STAGE}" WHERE caption_choice IN ('top_cap', 'ssl_cap'))
"""


def caption_quality(layout, status: dict[str, str]) -> dict[str, Any] | None:
    """{"sources": {source: metrics}, "all": metrics, "examples": {source: [...]}}, or None when the
    captioning stage is not complete or captioned nothing with a model."""
    if status.get(STAGE) != COMPLETE:
        return None
    con = open_catalog(layout)
    try:
        per_source = _rows(con, f"SELECT source, {_METRICS} FROM chosen GROUP BY source ORDER BY source")
        if not per_source:
            return None
        overall = _rows(con, f"SELECT '{ALL_SOURCES}' AS source, {_METRICS} FROM chosen")[0]
        examples: dict[str, list[dict[str, Any]]] = {}
        for row in _rows(
            con,
            f"""SELECT source, sample_id, file, caption, caption_choice, top_cap, ssl_cap FROM (
                    SELECT *, row_number() OVER (PARTITION BY source ORDER BY sample_id) AS n FROM chosen
                ) WHERE n <= {EXAMPLES} ORDER BY source, sample_id""",
        ):
            examples.setdefault(row.pop("source"), []).append(row)
    except duckdb.Error as error:
        raise RuntimeError(f"cannot read the {STAGE} shards for the caption report: {error}") from None
    finally:
        con.close()
    return {
        "sources": {row.pop("source"): row for row in per_source},
        "all": {key: value for key, value in overall.items() if key != "source"},
        "examples": examples,
    }


def _rows(con: duckdb.DuckDBPyConnection, sql: str) -> list[dict[str, Any]]:
    result = con.execute(_CHOSEN + sql, {"pattern": ORIENTATION.pattern})
    names = [column[0] for column in result.description]
    return [dict(zip(names, row, strict=True)) for row in result.fetchall()]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


TABLE_COLUMNS = (
    ("images", "images"),
    ("duplicate_share", "duplicates"),
    ("words_mean", "words"),
    ("words_p50", "p50"),
    ("words_p90", "p90"),
    ("orientation_share", "orientation"),
    ("candidate_orientation_share", "orientation (top 5)"),
    ("caption_score_mean", "clip score"),
    ("top_equals_ssl_share", "top = ssl"),
)


def quality_table(quality: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per source, then all sources) for text and Markdown."""
    header = ["source", *(title for _, title in TABLE_COLUMNS)]
    rows = [
        [name, *(_fmt(metrics[key]) for key, _ in TABLE_COLUMNS)]
        for name, metrics in [*quality["sources"].items(), (ALL_SOURCES, quality["all"])]
    ]
    return header, rows


def quality_artifact_rows(quality: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"source": name, **metrics}
        for name, metrics in [*quality["sources"].items(), (ALL_SOURCES, quality["all"])]
    ]
