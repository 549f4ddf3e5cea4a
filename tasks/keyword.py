"""keyword: keep the captions that name remote-sensing imagery, using published, versioned phrase lists.

The lists live in tasks/keywords/<version>.keywords.txt and <version>.exclusions.txt (their header explains
the syntax). Matching is case-insensitive and whole-word on a canonical copy of the caption (lower-case,
"'s" glued to its word, letters and digits split, every other run of characters one space), so
"Bird's-Eye View", "birds eye view" and "#birdseyeview" are the same phrase. An exclusion (a known false
positive such as "aerial yoga") vetoes only its own span.

Speed: PUB11 starts from billions of captions, so the work is vectorised with pyarrow.compute (RE2). One
loose, case-insensitive pass of the keyword alternation over the raw captions finds the few candidate rows
(it accepts everything the exact match accepts); canonicalisation, exclusion masking and whole-word
extraction then run on the candidates only.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from rs5m.config import KeywordConfig, PipelineConfig
from storage.schemas import KEYWORD_SCHEMA
from tasks.harness import Report, ShardStage
from tasks.shipped import resolve_shipped
from tasks.stage import ShardOutcome, split_by_reason

REASONS = {
    "no_keyword": "the caption contains no RS keyword (or is null or empty)",
    "excluded_keyword": "every RS keyword in the caption lies inside a false-positive phrase (detail: that phrase)",
}

LISTS_DIR = Path(__file__).parent / "keywords"
# A config value of this shape names a shipped list version; anything else is a file path.
# Bumped when the matching rules change, so that the identity (and the stage fingerprint) changes with them.
MATCHER_VERSION = "1"

_APOSTROPHES = "'\u2019\u2018`\u00b4"
# Canonicalisation, as RE2 rewrites applied in order to lower-cased captions.
_CANONICAL_STEPS = (
    (rf"[\s\pZ]*[{_APOSTROPHES}][\s\pZ]*s\b", "s"),  # bird 's eye / bird’s eye -> birds eye
    (r"(\pL)(\pN)", r"\1 \2"),  # landsat8 -> landsat 8
    (r"(\pN)(\pL)", r"\1 \2"),  # 2a -> 2 a
    (r"[^\pL\pN]+", " "),  # any other run of characters is one separator
)
# Replaces an exclusion span: not a word character, so no keyword can match across or inside it.
_MASK = " # "
# Between two words of a phrase in the loose prefilter: whatever canonicalisation turns into a separator.
_LOOSE_GAP = "[^a-z0-9]*"


@dataclass(frozen=True)
class Phrase:
    text: str  # as written in the list, whitespace collapsed: what a match reports
    canonical: str  # RE2 (and Python re) pattern over canonical text, word boundaries included
    loose: str  # RE2 pattern over raw text (case-insensitive), accepts a superset of `canonical`
    example: str  # the phrase itself in canonical form
    regex: re.Pattern[str]  # `canonical` compiled by Python, to tell which phrase an extracted span is


def _parse_phrase(text: str, origin: str) -> Phrase:
    anchored = text.startswith("^")
    body = text[1:] if anchored else text
    body = re.sub(rf"\s*[{_APOSTROPHES}]\s*s\b", "\0", body.lower())  # \0 marks an optional possessive s
    body = re.sub(r"([^\W\d_])(\d)", r"\1 \2", body)
    body = re.sub(r"(\d)([^\W\d_])", r"\1 \2", body)
    words = [w for w in re.split(r"[^\w\0]+|_", body) if w.strip("\0")]
    if not words or "^" in body:
        raise ValueError(f"{origin}: not a usable phrase: {text!r} (letters or digits, '^' only first)")
    canonical_words, loose_words = [], []
    for i, word in enumerate(words):
        possessive = word.endswith("\0")
        stem = re.escape(word.rstrip("\0"))
        canonical, loose = (
            stem + ("s?" if possessive else ""),
            stem + (f"{_LOOSE_GAP}s?" if possessive else ""),
        )
        if i == len(words) - 1 and not possessive and not stem[-1].isdigit():
            canonical, loose = canonical + "(?:e?s)?", loose + "(?:e?s)?"
        canonical_words.append(canonical)
        loose_words.append(loose)
    canonical = ("^" if anchored else r"\b") + " ?".join(canonical_words) + r"\b"
    return Phrase(
        text=" ".join(text.split()),
        canonical=canonical,
        loose=_LOOSE_GAP.join(loose_words),
        example=" ".join(w.replace("\0", "s") for w in words),
        regex=re.compile(canonical),
    )


def _read_list(path: Path, kind: str) -> list[Phrase]:
    phrases: list[Phrase] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if entry:
            phrases.append(_parse_phrase(entry, f"{path}:{number}"))
    if not phrases and kind == "keywords":
        raise ValueError(f"keyword list {path} has no entries")
    # Leftmost-first alternation: at one position the longer phrase ("satellite imagery") must win.
    return sorted(phrases, key=lambda p: (-len(p.example.split()), -len(p.example)))


def resolve_list(value: str, kind: str) -> Path:
    """A shipped version ("rs-v1") or a file path -> the list file; ValueError naming what is missing."""
    return resolve_shipped(value, LISTS_DIR, f".{kind}.txt", f"{kind} list")


def _alternation(phrases: list[Phrase], group: str) -> str:
    return f"(?P<{group}>" + "|".join(p.canonical for p in phrases) + ")"


class KeywordMatcher:
    """RS keyword matching over caption arrays, compiled once from a keyword and an exclusion list."""

    def __init__(self, keywords_path: Path, exclusions_path: Path) -> None:
        self.keywords = _read_list(keywords_path, "keywords")
        self.exclusions = _read_list(exclusions_path, "exclusions")
        normalised = "\n".join(
            [f"matcher {MATCHER_VERSION}", "keywords", *(p.text.lower() for p in self.keywords)]
            + ["exclusions", *(p.text.lower() for p in self.exclusions)]
        )
        self.identity = hashlib.sha256(normalised.encode()).hexdigest()
        self.candidate_pattern = "|".join(dict.fromkeys(p.loose for p in self.keywords))
        self._keyword_pattern = _alternation(self.keywords, "keyword")
        self._exclusion_pattern = _alternation(self.exclusions, "exclusion") if self.exclusions else None
        keyword_re = re.compile(self._keyword_pattern)
        # Only exclusions that contain a keyword can veto one: the detail of a drop names one of those.
        self._vetoing = [p for p in self.exclusions if keyword_re.search(p.example)]
        self._vetoing_pattern = _alternation(self._vetoing, "exclusion") if self._vetoing else None

    @classmethod
    def from_config(cls, config: KeywordConfig) -> KeywordMatcher:
        return cls(resolve_list(config.keywords, "keywords"), resolve_list(config.exclusions, "exclusions"))

    def match(self, captions: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
        """Per row: (the matched keyword as listed, or null; the vetoing exclusion as listed, or null).

        At most one of the two is set; both are null for captions without any keyword (and null captions).
        """
        if isinstance(captions, pa.ChunkedArray):
            captions = captions.combine_chunks()
        n = len(captions)
        is_candidate = pc.fill_null(
            pc.match_substring_regex(captions, self.candidate_pattern, ignore_case=True), False
        )
        canonical = pc.utf8_lower(captions.filter(is_candidate))
        for pattern, replacement in _CANONICAL_STEPS:
            canonical = pc.replace_substring_regex(canonical, pattern, replacement)
        masked = canonical
        if self._exclusion_pattern is not None:
            masked = pc.replace_substring_regex(canonical, self._exclusion_pattern, _MASK)
        keyword = self._extract(masked, self._keyword_pattern, self.keywords)
        exclusion = pa.nulls(len(canonical), pa.string())
        if self._vetoing_pattern is not None:
            vetoed = pc.and_(pc.is_null(keyword), pc.match_substring_regex(canonical, self._keyword_pattern))
            vetoed_exclusion = self._extract(canonical.filter(vetoed), self._vetoing_pattern, self._vetoing)
            exclusion = pc.replace_with_mask(exclusion, vetoed, vetoed_exclusion)
        nothing = pa.nulls(n, pa.string())
        return (
            pc.replace_with_mask(nothing, is_candidate, keyword),
            pc.replace_with_mask(nothing, is_candidate, exclusion),
        )

    @staticmethod
    def _extract(canonical: pa.Array, pattern: str, phrases: list[Phrase]) -> pa.Array:
        """The first phrase of `pattern` in each row, reported as listed; null where none occurs."""
        found = pc.struct_field(pc.extract_regex(canonical, pattern), [0])
        # Matched spans vary ("aerials", "birdseye view"); map each distinct one back to its list entry.
        spans = pc.unique(found).drop_null()
        entries = [next(p.text for p in phrases if p.regex.fullmatch(span)) for span in spans.to_pylist()]
        return pc.take(pa.array(entries, pa.string()), pc.index_in(found, spans))


def filter_shard(table: pa.Table, matcher: KeywordMatcher) -> ShardOutcome:
    """Decide every row of an INGEST_SCHEMA shard; survivors come back in KEYWORD_SCHEMA, in input order."""
    keyword, exclusion = matcher.match(table.column("caption"))
    reasons = pc.if_else(
        pc.is_valid(keyword),
        pa.scalar(None, pa.string()),
        pc.if_else(pc.is_valid(exclusion), pa.scalar("excluded_keyword"), pa.scalar("no_keyword")),
    )
    details = pc.coalesce(keyword, exclusion)
    outcome = split_by_reason(table.append_column("matched_keyword", keyword), reasons, details)
    kept = outcome.kept.select(KEYWORD_SCHEMA.names).cast(KEYWORD_SCHEMA)
    return ShardOutcome(kept=kept, decisions=outcome.decisions)


def _processor(config: PipelineConfig) -> Callable[[pa.Table], ShardOutcome]:
    return functools.partial(filter_shard, matcher=KeywordMatcher.from_config(config.keyword))


KEYWORD = ShardStage(
    name="keyword",
    upstream="ingest",
    reasons=REASONS,
    sections=("keyword",),
    code_version="1",
    report=Report("after RS keyword filtering", "kept"),
    adds=(KEYWORD_SCHEMA.field("matched_keyword"),),
    make_processor=_processor,
    identity=lambda config: {"lists": KeywordMatcher.from_config(config.keyword).identity},
)
