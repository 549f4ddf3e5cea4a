"""keyword: keep the captions that name remote-sensing imagery, using published, versioned phrase lists.

The lists live in tasks/keywords/<version>.keywords.txt and <version>.exclusions.txt (their header explains
the syntax). Matching is case-insensitive and whole-word on a canonical copy of the caption (lower-case,
"'s" glued to its word, letters and digits split, every other run of characters one space), so
"Bird's-Eye View", "birds eye view" and "#birdseyeview" are the same phrase. An exclusion (a known false
positive such as "aerial yoga") vetoes only its own span.

A proximity entry `CUE ~place` (rs-v2: "top view ~place") holds only where a word of the places list
(tasks/keywords/<version>.places.txt) lies within WINDOW words of the cue, before or after it. The proximity
entries are one RE2 pattern (any cue, up to WINDOW words, a place; or a place, up to WINDOW words, a cue)
beside the alternation of the plain phrases: one pass each finds the first span and names its entry, and where
both match the earlier span wins, as one alternation of both would report it (one pattern of both outgrew
RE2's DFA when the places grew). An exclusion's mask is no word, so it breaks the window.

A proximity entry `CUE ~geoname` (rs-v7: "from above ~geoname") holds where a name of the geonames list
(tasks/keywords/<version>.geonames.txt: GeoNames cities, regions and countries) lies within WINDOW words of
the cue. Its thousands of names would make RE2's automaton explode (a 12,000-name alternation took 18 s
instead of 0.05 s over 236,000 captions), so it is no part of the alternation: the rows that kept no other
keyword and contain such a cue, a few per thousand even on photo titles, look their cue's neighbours up in a
set of the names.

The word `<thousands>` in an entry (rs-v4: "from <thousands> feet") stands for a number of at least 1,000,
with or without thousands separators; `<hundreds>` (rs-v14: "fl <hundreds>", a flight level) for one of
three digits. Words joined by "|" are alternatives in one slot (rs-v17: "from|aboard a|the plane|747"), one
pattern for every phrase they spell.

Speed: PUB11 starts from billions of captions, so the work is vectorised with pyarrow.compute (RE2). A
loose prefilter of the keyword alternation over the lower-cased captions finds the few candidate rows (it
accepts everything the exact match accepts, and entries that begin and end with a letter only between
non-letters); canonicalisation, exclusion masking and whole-word extraction then run on the candidates only.
The prefilter is case-sensitive on lower-cased text rather than case-insensitive on the raw text: case
folding enlarges RE2's automaton, and past about 11,000 characters of alternation (rs-v6) its DFA ran out of
memory and fell back to an engine 40-80x slower. A large enough alternation does that even without case
folding (rs-v14), so a prefilter longer than PREFILTER_CHARS characters is cut into even parts, one pass
each.
For a list without cased letters beyond ASCII (the shipped ones) the text is ASCII-lower-cased, about ten
times cheaper than Unicode lower-casing; only the candidates are lower-cased in full. No pass uses a capturing
group over a large pattern: RE2 finds a whole match with its DFAs, a group with its slowest engine. Each kernel
call compiles its pattern (about 9 ms to find the first span of the plain keyword alternation), a fixed cost
per shard: give the stage large shards.
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
MATCHER_VERSION = "2"

_APOSTROPHES = "'\u2019\u2018`\u00b4"
# The only characters Unicode lower-casing (pyarrow's utf8_lower) turns into ASCII letters: İ -> i, K (Kelvin) -> k.
_LOWER_TO_ASCII = "\u0130\u212a"
# Canonicalisation, as RE2 rewrites applied in order to lower-cased captions, then trimmed: words of letters and
# digits between single spaces, so that `^` (a caption's start) holds after leading punctuation too. None of
# the rewrites uses a capturing group, which would run RE2's slowest engine over every match.
_CANONICAL_STEPS = (
    (rf"[\s\pZ]*[{_APOSTROPHES}][\s\pZ]*s\b", "s"),  # bird 's eye / bird’s eye -> birds eye
    (r"\pN+", " \\0 "),  # a number is a word of its own: landsat8 -> landsat 8, 2a -> 2 a
    # any other run of characters is one separator; a single space already is one, and leaving it out makes
    # this pass a few matches a caption instead of one per word (each match is an RE2 search)
    (r"[^\pL\pN ][^\pL\pN]*| [^\pL\pN]+", " "),
)
# Around each match of an alternation, to find its first span (see _first_span).
_OPEN, _CLOSE = "\x01", "\x02"
# Replaces an exclusion span: not a word character, so no keyword can match across or inside it.
_MASK = " # "
# Between two words of a phrase in the loose prefilter: whatever canonicalisation turns into a separator.
_LOOSE_GAP = "[^a-z0-9]*"
# The most characters of one prefilter pattern (see _candidate_patterns). Measured over 50,000 CC3M captions, before the
# bounded entries shared their plural: rs-v13's 17,700 characters in one pattern took 0.02 s, rs-v14's
# 21,300 0.9 s (its first 20,000 alone 0.02 s: where the fall comes depends on the entries), in two parts of
# 10,700 0.03 s. Sharing the plural made rs-v14's one pattern of 16,900 characters, 0.02 s.
PREFILTER_CHARS = 18_000
# The plural an entry's last word may take.
_PLURAL = "(?:e?s)?"
# Proximity entries: `CUE ~name` holds when a word of list `name` lies within WINDOW words of CUE, either side.
NEAR_LISTS = ("place", "geoname")
WINDOW = 4
# One word between a cue and its place: canonical text is words of letters and digits, single spaces and the
# mask's "#", which is no word, so an exclusion span breaks the window. Cheaper to compile than [\pL\pN]+.
_GAP = f"(?: [^ #]+){{0,{WINDOW}}} "


@dataclass(frozen=True)
class NumberWord:
    """A word of an entry that stands for a number: its mark among the words while an entry is parsed, its
    patterns over canonical and raw text, and the number an example shows."""

    mark: str
    canonical: str
    loose: str
    example: str


NUMBER_WORDS = {
    # At least 1,000, with or without thousands separators: "from <thousands> feet" matches "from 10,000
    # feet", "from 30000ft" and "from 1.500 m", not "from 10 feet" (canonical text: "10,000" -> "10 000").
    "<thousands>": NumberWord("\1", r"(?:\d{4,}|\d{1,3}(?: \d{3})+)", r"[0-9]+(?:[^a-z0-9]*[0-9]+)*", "1000"),
    # Three digits, 100 to 999: "fl <hundreds>" is a flight level ("FL360", "FL 370"), not "FL 2" or "FL 1000".
    "<hundreds>": NumberWord("\2", r"[1-9]\d\d", r"[1-9][0-9][0-9]", "100"),
}
_NUMBER_MARKS = {word.mark: word for word in NUMBER_WORDS.values()}


@dataclass(frozen=True)
class Phrase:
    text: str  # as written in the list, whitespace collapsed: what a match reports
    canonical: str  # RE2 (and Python re) pattern over canonical text, word boundaries included
    loose: str  # RE2 pattern over raw text (case-insensitive), accepts a superset of `canonical`
    example: str  # the phrase itself in canonical form (a proximity entry: its cue and the first place)
    regex: re.Pattern[str]  # `canonical` compiled by Python, to tell which phrase an extracted span is
    cue: Phrase | None = None  # a proximity entry's cue phrase; None for a plain phrase
    near: str | None = None  # a `~place` entry's place alternation (RE2 and Python re); None for the others
    named: bool = False  # a `~geoname` entry: its cue with a name of the geonames list nearby
    bounded: bool = False  # every way it can begin and end is a letter (the prefilter then bounds it)


def _parse_phrase(text: str, origin: str) -> Phrase:
    """One entry: words, or (since rs-v17) slots of alternatives ("from|aboard a|the plane|airplane" is any of
    the eight phrases), all matched by one pattern."""
    anchored = text.startswith("^")
    body = (text[1:] if anchored else text).lower()
    if "^" in body or not body.strip("| \t"):
        raise ValueError(f"{origin}: not a usable phrase: {text!r} (letters or digits, '^' only first)")
    if "|" in body:
        slots = [[_option(option, origin, text) for option in slot.split("|")] for slot in body.split()]
    else:  # no alternatives: one option, its words split at any separator
        slots = [[_option(body, origin, text)]]
    canonical_slots, loose_slots = [], []
    for slot in slots:
        canonical = [" ?".join(option.canonical) for option in slot]
        loose = [_LOOSE_GAP.join(option.loose) for option in slot]
        many = len(slot) > 1
        canonical_slots.append(f"(?:{'|'.join(canonical)})" if many else canonical[0])
        loose_slots.append(f"(?:{'|'.join(loose)})" if many else loose[0])
    if any(option.takes_plural for option in slots[-1]):
        canonical_slots[-1] += _PLURAL
        loose_slots[-1] += _PLURAL
    canonical = ("^" if anchored else r"\b") + " ?".join(canonical_slots) + r"\b"
    return Phrase(
        text=" ".join(text.split()),
        canonical=canonical,
        loose=_LOOSE_GAP.join(loose_slots),
        example=" ".join(slot[0].example for slot in slots),
        regex=re.compile(canonical),
        bounded=all(o.example[0].isalpha() for o in slots[0])
        and all(o.example[-1].isalpha() for o in slots[-1]),
    )


@dataclass(frozen=True)
class _Option:
    """One alternative of an entry's slot (or a whole entry without alternatives): its words' patterns over
    canonical and raw text, as an example, and whether its last word may take a plural."""

    canonical: list[str]
    loose: list[str]
    example: str
    takes_plural: bool


def _option(body: str, origin: str, text: str) -> _Option:
    for name, number in NUMBER_WORDS.items():
        body = body.replace(name, f" {number.mark} ")
    body = re.sub(rf"\s*[{_APOSTROPHES}]\s*s\b", "\0", body)  # \0 marks an optional possessive s
    body = re.sub(r"([^\W\d_])(\d)", r"\1 \2", body)
    body = re.sub(r"(\d)([^\W\d_])", r"\1 \2", body)
    words = [w for w in re.split(rf"[^\w\0{''.join(_NUMBER_MARKS)}]+|_", body) if w.strip("\0")]
    if not words:
        raise ValueError(f"{origin}: not a usable phrase: {text!r} (letters or digits, '^' only first)")
    canonical_words, loose_words = [], []
    for word in words:
        if word in _NUMBER_MARKS:
            canonical_words.append(_NUMBER_MARKS[word].canonical)
            loose_words.append(_NUMBER_MARKS[word].loose)
            continue
        possessive = word.endswith("\0")
        stem = re.escape(word.rstrip("\0"))
        canonical_words.append(stem + ("s?" if possessive else ""))
        loose_words.append(stem + (f"{_LOOSE_GAP}s?" if possessive else ""))
    last = words[-1]
    return _Option(
        canonical=canonical_words,
        loose=loose_words,
        example=" ".join(
            _NUMBER_MARKS[w].example if w in _NUMBER_MARKS else w.replace("\0", "s") for w in words
        ),
        takes_plural=last not in _NUMBER_MARKS and not last.endswith("\0") and not last[-1].isdigit(),
    )


def _split_near(text: str, origin: str) -> tuple[str, str | None]:
    """`CUE ~name` -> (CUE, name); a plain phrase -> (phrase, None). ValueError for a misplaced or unknown
    `~name` or an empty cue."""
    if "~" not in text:
        return text, None
    found = re.fullmatch(r"([^~]*?)\s*~(\w*)", text)
    if found is None or not found.group(2):
        raise ValueError(f"{origin}: '~name' must end the entry, once: {text!r} (e.g. 'from above ~place')")
    cue, name = found[1], found[2].lower()
    if name not in NEAR_LISTS:
        known = ", ".join(f"~{n}" for n in NEAR_LISTS)
        raise ValueError(f"{origin}: unknown {'~' + name!r} in {text!r} (known: {known})")
    if not re.search(r"[^\W_]", cue):
        raise ValueError(f"{origin}: no cue phrase before ~{name}: {text!r}")
    return cue, name


@dataclass(frozen=True)
class Places:
    phrases: list[Phrase]  # as listed, longest first
    pattern: str  # any of them: RE2 and Python re over canonical text


# The canonical pattern of a one-word place with the usual plural: \bcity(?:e?s)?\b
_ONE_WORD = re.compile(r"\\b([^ ?()\\]+)\(\?:e\?s\)\?\\b")


def _read_places(path: Path) -> Places:
    phrases = []
    for entry, origin in _entries(path):
        if "~" in entry or entry.startswith("^"):
            raise ValueError(f"{origin}: a place is a plain phrase (no '~', no '^'): {entry!r}")
        phrases.append(_parse_phrase(entry, origin))
    if not phrases:
        raise ValueError(f"places list {path} has no entries")
    phrases = _longest_first(phrases)
    # The one-word places share their plural and boundaries, "\b(?:cities|city|town)(?:e?s)?\b": the same
    # language in a third of the pattern (RE2 compiles the pattern on every kernel call).
    words = [m.group(1) for p in phrases if (m := _ONE_WORD.fullmatch(p.canonical))]
    others = [p.canonical for p in phrases if not _ONE_WORD.fullmatch(p.canonical)]
    shared = [r"\b(?:" + "|".join(words) + r")(?:e?s)?\b"] if words else []
    return Places(phrases, "(?:" + "|".join(shared + others) + ")")


@dataclass(frozen=True)
class Geonames:
    names: frozenset[str]  # canonical text of each name ("cape town")
    # The words a name can start with ("cape") and end with ("town"), each with the most words of a name that
    # does: most positions are passed at once, and a common word ("new", "city") tries only lengths that occur.
    longest_from: dict[str, int]
    longest_to: dict[str, int]
    name_starts: pa.Array  # the names of one word and the first two words of the others

    @classmethod
    def of(cls, names: frozenset[str]) -> Geonames:
        longest_from: dict[str, int] = {}
        longest_to: dict[str, int] = {}
        for words in (name.split() for name in names):
            longest_from[words[0]] = max(longest_from.get(words[0], 0), len(words))
            longest_to[words[-1]] = max(longest_to.get(words[-1], 0), len(words))
        starts = sorted({" ".join(name.split()[:2]) for name in names})
        return cls(names, longest_from, longest_to, pa.array(starts, pa.string()))

    def may_name(self, texts: pa.Array) -> pa.Array:
        """Per canonical text, False where no name occurs in it (so none lies near a cue), vectorised: no word
        is a name of one word and no two words in a row begin a longer one. Word pairs that straddle two texts
        can only add rows, which the exact check then passes over."""
        split = pc.utf8_split_whitespace(texts)
        words, rows = pc.list_flatten(split), pc.list_parent_indices(split)
        pairs = pc.binary_join_element_wise(words[:-1], words[1:], " ")
        hit = pc.is_in(pa.concat_arrays([words, pairs]), value_set=self.name_starts)
        named = pc.unique(pa.concat_arrays([rows, rows[:-1]]).filter(hit))
        return pc.is_in(pa.array(range(len(texts)), pa.int64()), value_set=named)

    def near(self, before: list[str], after: list[str]) -> bool:
        """Whether a name lies within WINDOW words before (ending `before`) or after (starting `after`) a cue."""
        for gap in range(WINDOW + 1):
            if gap < len(after) and (longest := self.longest_from.get(after[gap])):
                for length in range(1, min(longest, len(after) - gap) + 1):
                    if " ".join(after[gap : gap + length]) in self.names:
                        return True
            end = len(before) - gap
            if end > 0 and (longest := self.longest_to.get(before[end - 1])):
                for length in range(1, min(longest, end) + 1):
                    if " ".join(before[end - length : end]) in self.names:
                        return True
        return False

    def named_in(self, text: str) -> bool:
        """Whether a name occurs anywhere in a canonical text."""
        words = text.split()
        return any(self.near([], words[start:]) for start in range(len(words)))


def _canonical(lowered: pa.Array) -> pa.Array:
    """The canonical copy of lower-cased texts (captions, or the names of a geonames list)."""
    for pattern, replacement in _CANONICAL_STEPS:
        lowered = pc.replace_substring_regex(lowered, pattern, replacement)
    return pc.utf8_trim(lowered, " ")


def _read_geonames(path: Path) -> Geonames:
    canonical = _canonical(pc.utf8_lower(pa.array([entry for entry, _ in _entries(path)], pa.string())))
    names = frozenset(" ".join(name.split()) for name in canonical.to_pylist() if name.strip())
    if not names:
        raise ValueError(f"geonames list {path} has no entries")
    return Geonames.of(names)


def _parse_near(text: str, cue_text: str, places: Places | None, origin: str) -> Phrase:
    """A proximity entry: the cue with a place (`~place`: of `places`) or a name (`~geoname`: places None) at
    most WINDOW words before or after it. A `~geoname` entry's pattern is its cue's: its names are looked up
    apart (KeywordMatcher._named_entry)."""
    cue = _parse_phrase(cue_text, origin)
    if cue.canonical.startswith("^"):
        raise ValueError(f"{origin}: a proximity entry cannot be anchored with '^': {text!r}")
    canonical = cue.canonical if places is None else _near_pattern([cue.canonical], places.pattern)
    return Phrase(
        text=" ".join(text.split()),
        canonical=canonical,
        loose=cue.loose,  # every match contains the cue
        example=cue.example if places is None else f"{cue.example} {places.phrases[0].example}",
        bounded=cue.bounded,
        regex=cue.regex if places is None else re.compile(canonical),
        cue=cue,
        near=None if places is None else places.pattern,
        named=places is None,
    )


def _near_pattern(cues: list[str], place: str) -> str:
    """Any of the cues with a place at most WINDOW words after it, or a place at most WINDOW words before it."""
    cue = cues[0] if len(cues) == 1 else "(?:" + "|".join(cues) + ")"
    return f"(?:{cue}{_GAP}{place}|{place}{_GAP}{cue})"


def _entries(path: Path) -> list[tuple[str, str]]:
    """(entry, "file:line") for every entry of a list file, comments and blank lines left out."""
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if entry:
            entries.append((entry, f"{path}:{number}"))
    return entries


def _parse_list(entries: list[tuple[str, str]], places: Places | None, allow_named: bool) -> list[Phrase]:
    phrases = []
    for entry, origin in entries:
        cue, near = _split_near(entry, origin)
        if near is None:
            phrases.append(_parse_phrase(entry, origin))
        elif near == "geoname":
            if not allow_named:
                raise ValueError(
                    f"{origin}: {entry!r}: '~geoname' entries belong in a keyword list, not exclusions"
                )
            phrases.append(_parse_near(entry, cue, None, origin))
        elif places is None:
            raise ValueError(f"{origin}: {entry!r}: proximity entries need a places list")
        else:
            phrases.append(_parse_near(entry, cue, places, origin))
    return _longest_first(phrases)


def _longest_first(phrases: list[Phrase]) -> list[Phrase]:
    # Leftmost-first alternation: at one position the longer phrase ("satellite imagery") must win; plain
    # phrases come before proximity entries, which go by the length of their cue.
    def key(p: Phrase) -> tuple[bool, int, int]:
        example = p.example if p.cue is None else p.cue.example
        return p.cue is not None, -len(example.split()), -len(example)

    return sorted(phrases, key=key)


# Shipped keyword list version -> the (exclusions, places, geonames) versions it was released and measured with:
# with them an older version matches as it always did. A list that a version's entries never use is never read
# (rs-v1 has no proximity entry, rs-v2 to rs-v6 no `~geoname`).
RELEASED_WITH = {
    "rs-v1": ("rs-v1", "rs-v2", "rs-v1"),
    "rs-v2": ("rs-v2", "rs-v2", "rs-v1"),
    "rs-v3": ("rs-v2", "rs-v2", "rs-v1"),
    "rs-v4": ("rs-v2", "rs-v2", "rs-v1"),
    "rs-v5": ("rs-v2", "rs-v3", "rs-v1"),
    "rs-v6": ("rs-v2", "rs-v3", "rs-v1"),
    "rs-v7": ("rs-v2", "rs-v3", "rs-v1"),
    "rs-v8": ("rs-v2", "rs-v3", "rs-v1"),
    "rs-v9": ("rs-v2", "rs-v3", "rs-v1"),
    "rs-v10": ("rs-v2", "rs-v3", "rs-v1"),
    "rs-v11": ("rs-v3", "rs-v3", "rs-v1"),
    "rs-v12": ("rs-v3", "rs-v3", "rs-v1"),
    "rs-v13": ("rs-v3", "rs-v3", "rs-v1"),
    "rs-v14": ("rs-v3", "rs-v3", "rs-v1"),
    "rs-v15": ("rs-v3", "rs-v4", "rs-v1"),
    "rs-v16": ("rs-v3", "rs-v4", "rs-v1"),
    "rs-v17": ("rs-v3", "rs-v4", "rs-v1"),
    "rs-v18": ("rs-v3", "rs-v4", "rs-v1"),
}


def released_config(version: str) -> KeywordConfig:
    """The keyword config of a shipped keyword list version, with the lists it was released with."""
    exclusions, places, geonames = RELEASED_WITH[version]
    return KeywordConfig(keywords=version, exclusions=exclusions, places=places, geonames=geonames)


def resolve_list(value: str, kind: str) -> Path:
    """A shipped version ("rs-v1") or a file path -> the list file; ValueError naming what is missing."""
    return resolve_shipped(value, LISTS_DIR, f".{kind}.txt", f"{kind} list")


def _candidate_pattern(loose: list[tuple[str, bool]]) -> str:
    """The loose prefilter over lower-cased raw text: any of these (loose pattern, bounded) entries. Bounded
    entries (those that begin and end with a letter) match only between non-letters (canonical text splits
    words at every other character, digits included), so a short word does not make every caption holding it
    inside a longer one a candidate ("iss" in "mission", "issue"). Grouped, the bounds and the plural cost the
    pattern three short groups, not one per entry."""
    bounded = [pattern for pattern, is_bounded in loose if is_bounded]
    free = [pattern for pattern, is_bounded in loose if not is_bounded]
    inner = "|".join(dict.fromkeys(pattern.removesuffix(_PLURAL) for pattern in bounded))
    groups = [f"(?:^|[^a-z])(?:{inner}){_PLURAL}(?:[^a-z]|$)"] if bounded else []
    return "|".join(groups + free)


def _candidate_patterns(keywords: list[Phrase]) -> list[str]:
    """The prefilter as the fewest even parts of the keyword list (every n-th entry) whose patterns are at most
    PREFILTER_CHARS long: a row is a candidate when any part matches it. One pass of a larger alternation can
    outgrow RE2's DFA memory and fall back to its far slower engine, while each pass costs a scan of every
    row (about 0.075 s per 500,000 captions), so a list is cut only when it must be."""
    loose = list(dict.fromkeys((phrase.loose, (phrase.cue or phrase).bounded) for phrase in keywords))
    parts = -(-len(_candidate_pattern(loose)) // PREFILTER_CHARS)
    while True:
        patterns = [_candidate_pattern(loose[i::parts]) for i in range(parts)]
        if parts >= len(loose) or max(map(len, patterns)) <= PREFILTER_CHARS:
            return patterns
        parts += 1


def matches_any(texts: pa.Array, patterns: list[str]) -> pa.Array:
    """Rows any of the patterns matches: one RE2 pass per pattern (a prefilter's parts), or-ed."""
    return functools.reduce(pc.or_, (pc.match_substring_regex(texts, pattern) for pattern in patterns))


def _start(text: str, span: str) -> int:
    """Where a span that a pattern of word-bounded entries found first in `text` begins: its first
    occurrence with the same (ASCII, as RE2's) word bounds, since the entry that matched it there would have
    matched any earlier one."""
    found = re.search(rf"\b{re.escape(span)}\b", text, re.ASCII)
    assert found is not None, (text, span)
    return found.start()


def _alternations(phrases: list[Phrase]) -> list[str]:
    """The phrases as alternations, in list order: one of the plain phrases, then one of the proximity entries
    (last in the list), which share their place alternation: one alternative of all their cues (in list
    order), the entry named from the span. Two patterns, not one, because one of both outgrew RE2's DFA memory
    when the places grew (rs-v4: 0.13 s instead of 0.03 s for 7,000 candidate rows); each is also a small
    compile, which every kernel call pays."""
    plain = [p.canonical for p in phrases if p.cue is None]
    near = [p for p in phrases if p.cue is not None]
    patterns = ["|".join(plain)] if plain else []
    if near:
        patterns.append(
            _near_pattern([p.cue.canonical for p in near if p.cue is not None], near[0].near or "")
        )
    return patterns


def _first_span(texts: pa.Array, pattern: str) -> pa.Array:
    """The first span of `pattern` in each canonical text, null where it does not occur. RE2 finds a match's
    whole span with its DFAs alone, while a capturing group (pyarrow's extract_regex) runs its slowest engine
    over each match, which costs a large alternation about 1.4 microseconds a row: so every match is marked
    (a global replace, which asks for the whole span only), and the first marked span extracted with a small
    pattern. Canonical text holds no control character, so the marks are unambiguous."""
    marked = pc.replace_substring_regex(texts, pattern, f"{_OPEN}\\0{_CLOSE}")
    return pc.struct_field(pc.extract_regex(marked, f"{_OPEN}(?P<span>[^{_CLOSE}]*){_CLOSE}"), [0])


class KeywordMatcher:
    """RS keyword matching over caption arrays, compiled once from a keyword, an exclusion and (when an
    entry uses `~place` or `~geoname`) a places and a geonames list."""

    def __init__(
        self,
        keywords_path: Path,
        exclusions_path: Path,
        places_path: Path | None = None,
        geonames_path: Path | None = None,
    ) -> None:
        keyword_entries, exclusion_entries = _entries(keywords_path), _entries(exclusions_path)
        if not keyword_entries:
            raise ValueError(f"keyword list {keywords_path} has no entries")
        near = {_split_near(entry, origin)[1] for entry, origin in keyword_entries + exclusion_entries}
        # Read only when used: lists without such entries (rs-v1; rs-v6 for geonames) keep their identity.
        self.places = _read_places(places_path) if "place" in near and places_path is not None else None
        geonames = _read_geonames(geonames_path) if "geoname" in near and geonames_path is not None else None
        self.keywords = _parse_list(keyword_entries, self.places, allow_named=True)
        self.exclusions = _parse_list(exclusion_entries, self.places, allow_named=False)
        named = [p for p in self.keywords if p.named]
        if named and geonames is None:
            raise ValueError(f"{keywords_path}: {named[0].text!r}: '~geoname' entries need a geonames list")
        lines = [f"matcher {MATCHER_VERSION}", "keywords", *(p.text.lower() for p in self.keywords)]
        lines += ["exclusions", *(p.text.lower() for p in self.exclusions)]
        if self.places is not None:
            lines += [f"places within {WINDOW} words", *(p.text.lower() for p in self.places.phrases)]
        if geonames is not None:
            lines += [f"geonames within {WINDOW} words", *sorted(geonames.names)]
        normalised = "\n".join(lines)
        self.identity = hashlib.sha256(normalised.encode()).hexdigest()
        self.candidate_patterns = _candidate_patterns(self.keywords)
        # The prefilter lower-cases ASCII only (about ten times cheaper than Unicode lower-casing) when its
        # patterns hold no cased letter beyond ASCII: every other letter of the text then counts the same
        # upper- or lower-case, and a row holding one of the two characters that lower-case to ASCII letters
        # is a candidate by itself. The candidates are then lower-cased in full, so results do not change.
        if all(c.isascii() or c.lower() == c.upper() for c in "".join(self.candidate_patterns)):
            first, *rest = self.candidate_patterns
            self._prefilter = (pc.ascii_lower, [f"{first}|[{_LOWER_TO_ASCII}]", *rest])
        else:
            self._prefilter = (pc.utf8_lower, self.candidate_patterns)
        in_alternation = [p for p in self.keywords if not p.named]
        self._keyword_patterns = _alternations(in_alternation)
        # masking needs no entry names, so one pattern, which is small enough
        self._exclusion_pattern = "|".join(_alternations(self.exclusions)) or None
        self._in_alternation, self._named, self._geonames = in_alternation, named, geonames
        # The cues of the `~geoname` entries, longest first, as RE2 (rows to look at) and Python re (where).
        self._named_cue_pattern = "|".join(p.canonical for p in named)
        self._named_cue_re = re.compile(self._named_cue_pattern, re.ASCII) if named else None
        # Only exclusions that contain a keyword, a proximity cue, a place or a name (masking one breaks a
        # window) can veto one: the detail of a drop names one of those.
        parts = [p.regex for p in self.keywords] + [p.cue.regex for p in self.keywords if p.cue is not None]
        if self.places is not None:
            parts.append(re.compile(self.places.pattern))
        self._vetoing = [
            p
            for p in self.exclusions
            if any(r.search(p.example) for r in parts)
            or (geonames is not None and geonames.named_in(p.example))
        ]
        self._vetoing_patterns = _alternations(self._vetoing)
        # matched span -> its list entry, one map per alternation (keywords, vetoing exclusions)
        self._keyword_of_span: dict[str, str] = {}
        self._exclusion_of_span: dict[str, str] = {}

    @classmethod
    def from_config(cls, config: KeywordConfig) -> KeywordMatcher:
        """The matcher of the configured lists, built once per process for the same file contents:
        reading the lists and the geonames takes 0.2-0.4 s, far more than matching a 10,000-row shard, and
        the stage needs it for every shard (its fingerprint and its processor)."""
        paths = (
            resolve_list(config.keywords, "keywords"),
            resolve_list(config.exclusions, "exclusions"),
            resolve_list(config.places, "places"),
            resolve_list(config.geonames, "geonames"),
        )
        return _matcher_of(paths, tuple(hashlib.sha256(p.read_bytes()).hexdigest() for p in paths))

    def match(self, captions: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
        """Per row: (the matched keyword as listed, or null; the vetoing exclusion as listed, or null).

        At most one of the two is set; both are null for captions without any keyword (and null captions).
        """
        position, keyword, exclusion = self.match_candidates(captions)
        return pc.take(keyword, position), pc.take(exclusion, position)

    def match_candidates(self, captions: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, pa.Array, pa.Array]:
        """(position, keyword, exclusion): `match` for the candidate rows only, the few the prefilter let
        through; position holds each caption's candidate index, null for the others (no keyword)."""
        if isinstance(captions, pa.ChunkedArray):
            captions = captions.combine_chunks()
        lower, prefilter = self._prefilter
        lowered = lower(captions)
        is_candidate = pc.fill_null(matches_any(lowered, prefilter), False)
        canonical = _canonical(pc.utf8_lower(captions.filter(is_candidate)))
        masked = canonical
        if self._exclusion_pattern is not None:
            masked = pc.replace_substring_regex(canonical, self._exclusion_pattern, _MASK)
        # The rows the exclusions changed are matched twice, masked and not, in the same pass (one compile of
        # the keyword alternation): only such a row that kept no keyword can have had one vetoed, a keyword
        # in its unmasked text, inside the first vetoing exclusion, which the detail names.
        changed = pc.not_equal(masked, canonical)
        unmasked = canonical.filter(changed)
        both = pa.concat_arrays([masked, unmasked])
        found = self._with_named(both, self._extract(both))
        keyword, had_keyword = found[: len(masked)], pc.is_valid(found[len(masked) :])
        exclusion = pa.nulls(len(canonical), pa.string())
        masked_out = pc.and_(pc.is_null(keyword), changed)
        if self._vetoing_patterns and pc.any(masked_out).as_py():
            held = pc.is_null(keyword.filter(changed))  # of the changed rows, those left without a keyword
            vetoing = self._first_entry(
                unmasked.filter(held), self._vetoing_patterns, self._vetoing, self._exclusion_of_span
            )
            vetoes = pc.if_else(had_keyword.filter(held), vetoing, pa.scalar(None, pa.string()))
            exclusion = pc.replace_with_mask(exclusion, masked_out, vetoes)
        position = pc.subtract(pc.cumulative_sum(pc.cast(is_candidate, pa.int32())), 1)
        position = pc.if_else(is_candidate, position, pa.scalar(None, pa.int32()))
        return position, keyword, exclusion

    def _extract(self, canonical: pa.Array) -> pa.Array:
        """The first keyword of the alternation in each row, reported as listed; null where none occurs."""
        if not self._keyword_patterns:
            return pa.nulls(len(canonical), pa.string())
        return self._first_entry(
            canonical, self._keyword_patterns, self._in_alternation, self._keyword_of_span
        )

    @staticmethod
    def _first_entry(
        canonical: pa.Array, patterns: list[str], phrases: list[Phrase], entry_of_span: dict[str, str]
    ) -> pa.Array:
        """The first span of the alternations of `phrases` (plain, then proximity) in each row, reported as its
        list entry; null where none occurs. Where both match, the earlier span wins and, at the same place,
        the plain one: what one alternation of both finds."""
        found = _first_span(canonical, patterns[0])
        if len(patterns) == 2:
            near = _first_span(canonical, patterns[1])
            both = pc.and_(pc.is_valid(found), pc.is_valid(near))
            near_first = pc.is_null(found)
            if pc.any(both).as_py():  # a few rows in 10,000: compare where their spans begin
                rows = zip(*(a.filter(both).to_pylist() for a in (canonical, found, near)), strict=True)
                earlier = [_start(text, near_span) < _start(text, span) for text, span, near_span in rows]
                near_first = pc.replace_with_mask(near_first, both, pa.array(earlier, pa.bool_()))
            found = pc.if_else(near_first, near, found)
        # Matched spans vary ("aerials", "birdseye view", "top view of the old town"); map each distinct one
        # back to its list entry, remembering the answer (most spans recur from shard to shard).
        spans = pc.unique(found).drop_null()
        if len(entry_of_span) > 100_000:
            entry_of_span.clear()
        entries = []
        for span in spans.to_pylist():  # the map is shared by the threads of one matcher: read it once
            entry = entry_of_span.get(span)
            if entry is None:
                entry = entry_of_span[span] = next(p.text for p in phrases if p.regex.fullmatch(span))
            entries.append(entry)
        return pc.take(pa.array(entries, pa.string()), pc.index_in(found, spans))

    def _with_named(self, masked: pa.Array, keyword: pa.Array) -> pa.Array:
        """`keyword`, with the `~geoname` entry that holds in each row that had none (a fallback: a row that
        matches any other entry reports that one)."""
        if not self._named:
            return keyword
        # narrowed in steps, each over the rows left: no keyword, a cue, then maybe a name
        look = pc.is_null(keyword)
        look = pc.replace_with_mask(
            look, look, pc.match_substring_regex(masked.filter(look), self._named_cue_pattern)
        )
        if self._geonames is not None and pc.any(look).as_py():
            look = pc.replace_with_mask(look, look, self._geonames.may_name(masked.filter(look)))
        if not pc.any(look).as_py():
            return keyword
        entries = [self._named_entry(text) for text in masked.filter(look).to_pylist()]
        return pc.replace_with_mask(keyword, look, pa.array(entries, pa.string()))

    def _named_entry(self, text: str) -> str | None:
        """The first `~geoname` entry whose cue has a name within WINDOW words in a canonical text, or None.
        An exclusion's mask ("#") ends the window, as it does for `~place`."""
        if self._named_cue_re is None or self._geonames is None:
            return None
        for cue in self._named_cue_re.finditer(text):
            before = text[: cue.start()].split()
            after = text[cue.end() :].split()
            before = before[len(before) - before[::-1].index("#") :] if "#" in before else before
            after = after[: after.index("#")] if "#" in after else after
            if self._geonames.near(before, after):
                return next(
                    p.text for p in self._named if p.cue is not None and p.cue.regex.fullmatch(cue[0])
                )
        return None


@functools.lru_cache(maxsize=8)
def _matcher_of(paths: tuple[Path, ...], _contents: tuple[str, ...]) -> KeywordMatcher:
    """One matcher per set of list files and their contents' digests: an edited list is read again."""
    return KeywordMatcher(*paths)


def filter_shard(table: pa.Table, matcher: KeywordMatcher) -> ShardOutcome:
    """Decide every row of an INGEST_SCHEMA shard; survivors come back in KEYWORD_SCHEMA, in input order."""
    position, keyword, exclusion = matcher.match_candidates(table.column("caption"))
    # Decided on the few candidates, then spread over all rows in one take each: a row the prefilter
    # rejected points past the candidates, at "no_keyword" (reason) and null (detail).
    reason = pc.if_else(
        pc.is_valid(keyword),
        pa.scalar(None, pa.string()),
        pc.if_else(pc.is_valid(exclusion), pa.scalar("excluded_keyword"), pa.scalar("no_keyword")),
    )
    everywhere = pc.fill_null(position, len(keyword))
    reasons = pc.take(pa.concat_arrays([reason, pa.array(["no_keyword"])]), everywhere)
    details = pc.take(
        pa.concat_arrays([pc.coalesce(keyword, exclusion), pa.nulls(1, pa.string())]), everywhere
    )
    outcome = split_by_reason(table, reasons, details)
    kept = outcome.kept.append_column("matched_keyword", keyword.filter(pc.is_valid(keyword)))
    return ShardOutcome(
        kept=kept.select(KEYWORD_SCHEMA.names).cast(KEYWORD_SCHEMA), decisions=outcome.decisions
    )


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
    batch_rows=lambda config: config.keyword.batch_rows,
)
