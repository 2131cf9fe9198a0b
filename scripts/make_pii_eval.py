"""A labelled PII set from our own templates, and its score per kind with the appliance's detector.

    .venv/bin/python scripts/make_pii_eval.py make --seed 1 --n 600 --out /tmp/pii_eval.jsonl
    .venv/bin/python scripts/make_pii_eval.py score /tmp/pii_eval.jsonl
    .venv/bin/python scripts/make_pii_eval.py stream /tmp/pii_eval.jsonl
    .venv/bin/python scripts/make_pii_eval.py convert tests/data/pii_handwritten.txt --out /tmp/pii_hand.jsonl

`make` writes JSONL lines {"text", "spans": [{"start", "end", "kind"}]}. Every word list below was written
for this script (no public data set, no presidio-research data, no Faker): names from many languages,
streets, cities, organisations; card numbers get a valid Luhn digit, IBANs their mod-97 check digits. A
third of the texts hold no PII at all but capitalised words, dates and numbers that look like it.

`score` runs PiiDetector (with the named-entity detector unless --patterns-only) and prints per kind:
recall (gold spans overlapped by a finding of the same kind), precision (findings overlapping a gold span
of the same kind), and masked (gold spans of which at least 90% of the characters fall in some finding of
any kind: what masking hides). It also prints ms per KB of text, measured over the whole set.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import string
import sys
import time
from collections import Counter
from pathlib import Path

FIRST = (
    "James Mary Robert Patricia Michael Jennifer David Linda William Elizabeth Richard Barbara Thomas Susan "
    "Charles Jessica Daniel Sarah Matthew Karen Anthony Nancy Mark Lisa Steven Emily Andrew Michelle Joshua "
    "Olivia Emma Noah Liam Sophia Ava Lucas Mia Ethan Amelia Oliver Charlotte Harry Isla George Freya Jack "
    "Grace Mohammed Fatima Ahmed Aisha Omar Layla Yusuf Zainab Ali Mariam Wei Li Jun Mei Hiroshi Yuki Kenji "
    "Sakura Min-jun Ji-woo Arjun Priya Rahul Ananya Vikram Deepika Sanjay Kavya Olumide Chiamaka Kwame Ama "
    "Thabo Nomvula Juan Sofia Carlos Valentina Diego Camila Mateo Lucia Pedro Ines Jose Gabriela Pierre Camille "
    "Louis Chloe Hans Greta Lukas Lena Jakob Anna Giovanni Giulia Marco Francesca Lars Ingrid Sven Astrid "
    "Piotr Agnieszka Ivan Olga Dmitri Natalia Mehmet Elif Ayse Emre Siobhan Declan Niamh Eoin Rhys Carys"
).split()
LAST = (
    "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez Gonzalez Wilson "
    "Anderson Thomas Taylor Moore Jackson Martin Lee Thompson White Harris Clark Lewis Robinson Walker Young "
    "Allen King Wright Scott Green Baker Adams Nelson Hill Campbell Mitchell Roberts Carter Phillips Evans "
    "Turner Parker Collins Edwards Stewart Morris Murphy Cook Rogers Morgan Cooper Peterson Reed Bailey Kelly "
    "Howard Cox Ward Richardson Watson Brooks Wood James Bennett Gray Hughes Price Sanders Patel Shah Singh "
    "Sharma Gupta Kumar Reddy Iyer Nair Chen Wang Zhang Liu Yang Huang Zhao Wu Tanaka Suzuki Takahashi Watanabe "
    "Kim Park Choi Nguyen Tran Pham Okafor Adeyemi Mensah Owusu Diallo Nkosi Dlamini Haddad Khalil Mansour "
    "Rahman Hussain Karimi Yilmaz Demir Kaya Muller Schmidt Schneider Fischer Weber Becker Rossi Russo Ferrari "
    "Esposito Bianchi Dubois Lefebvre Moreau Laurent Fernandez Silva Santos Oliveira Pereira Costa Kowalski "
    "Nowak Ivanov Petrov Novak Jensen Hansen Larsen Andersson Johansson Nilsson O'Brien O'Connor McCarthy "
    "MacDonald Fitzgerald"
).split()
STREET_NAMES = (
    "Oak Maple Cedar Pine Elm Willow Birch Chestnut Walnut Highland Lakeview Sunset Riverside Park Church Mill "
    "Station Victoria Albert Queen King Bridge Market Spring Meadow Forest Hillcrest Orchard Harbor Mount "
    "Pleasant Greenwood Fairview Jefferson Lincoln Washington Madison Franklin Kingsley Ashford Wellington "
    "Baker Abbey Castle Grove Newport Clifton Belmont Winchester"
).split()
STREET_TYPES = ["Street", "St", "Avenue", "Ave", "Road", "Rd", "Lane", "Drive", "Boulevard", "Blvd", "Way",
                "Court", "Place", "Terrace", "Close", "Crescent", "Parkway"]
US_CITIES = [("Springfield", "IL"), ("Portland", "OR"), ("Austin", "TX"), ("Denver", "CO"), ("Columbus", "OH"),
             ("Raleigh", "NC"), ("Madison", "WI"), ("Boise", "ID"), ("Tucson", "AZ"), ("Albany", "NY"),
             ("Fresno", "CA"), ("Omaha", "NE"), ("Richmond", "VA"), ("Savannah", "GA"), ("Burlington", "VT")]
UK_CITIES = ["London", "Manchester", "Leeds", "Bristol", "Glasgow", "Cardiff", "Edinburgh", "Norwich",
             "Brighton", "York", "Oxford", "Cambridge", "Belfast", "Sheffield"]
PLACES = ["Paris", "Berlin", "Madrid", "Rome", "Tokyo", "Lagos", "Nairobi", "Mumbai", "Toronto", "Sydney",
          "Chicago", "Boston", "Seattle", "Dublin", "Lisbon", "Vienna", "Prague", "Warsaw", "Cairo", "Lima",
          "Canada", "Germany", "Japan", "Brazil", "Kenya", "Mexico", "Spain", "Italy", "Norway", "India",
          "Texas", "California", "Scotland", "Bavaria", "Ontario", "Queensland"]
ORG_HEADS = ["Northwind", "Bluepeak", "Riverstone", "Ironbridge", "Silverline", "Greenfield", "Brightwater",
             "Redwood", "Summit", "Harborview", "Crestline", "Oakmont", "Lakeshore", "Pinecrest", "Stonegate",
             "Westbrook", "Eastgate", "Goldleaf", "Clearwater", "Fairhaven"]
ORG_TAILS = ["Analytics", "Logistics", "Health", "Capital", "Energy", "Foods", "Systems", "Labs", "Insurance",
             "Consulting", "Pharmaceuticals", "Software", "Partners", "Holdings", "Media", "Robotics"]
ORG_SUFFIXES = ["Inc.", "Ltd", "LLC", "GmbH", "Group", "Corporation", "plc", "Co.", "AG", "S.A."]
ORGS_KNOWN = ["Microsoft", "Google", "Amazon", "the World Health Organization", "Siemens", "Toyota", "Barclays",
              "the United Nations", "Deutsche Bank", "Unilever", "Oxford University", "Stanford University",
              "the Red Cross", "Samsung", "Nestle", "Pfizer"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]

SENT_PERSON = [
    "{} will join the call on Thursday.", "I spoke with {} about the contract yesterday.",
    "Please forward the draft to {} before noon.", "The report was reviewed by {} and approved.",
    "According to {}, the shipment is delayed.", "{} asked whether the meeting could move to Friday.",
    "We hired {} as our new project lead.", "Can you remind {} to sign the form?",
    "Thanks again, {}, for your help.", "My colleague {} handles the billing questions.",
    "The patient, {}, reported mild symptoms.", "{} and I will present the results.",
]
SENT_ADDRESS = [
    "Ship it to {} please.", "Our new office is at {}.", "The tenant lives at {} since 2019.",
    "Mail the cheque to {}.", "Deliveries go to {} on weekdays.", "She moved to {} last spring.",
    "Billing address: {}", "The inspection at {} is booked.",
]
SENT_LOCATION = [
    "We flew to {} for the conference.", "The team in {} is growing fast.", "He grew up near {}.",
    "Prices in {} went up this year.", "Our supplier ships from {}.", "She spent the summer in {}.",
]
SENT_ORG = [
    "I work for {} as an analyst.", "The contract with {} ends in June.", "{} announced record profits.",
    "We filed a complaint against {}.", "She left {} after ten years.", "The grant came from {}.",
]
SENT_DOB = [
    "The applicant was born on {}.", "Date of birth: {}", "DOB {}", "He was born {} in a small town.",
    "Her birthday is {}, she says.", "born {}",
]
SENT_PATTERN = {
    "phone": ["Call me on {} after six.", "My mobile is {}.", "Reach the front desk at {}.", "Tel: {}"],
    "email": ["Write to {} for details.", "My address is {}.", "Contact: {}"],
    "credit_card": ["Charge it to card {} please.", "The card number is {}.", "Paid with {} yesterday."],
    "iban": ["Transfer the deposit to {}.", "IBAN: {}", "Our account is {}."],
    "us_ssn": ["My SSN is {}.", "SSN: {}"],
    "ip_address": ["The server at {} is down.", "Requests come from {}."],
}
NEGATIVES = [
    "The Annual Review takes place on 12 March 2024 in the Main Hall.",
    "Version 2.4.1 fixes the Export bug; see ticket 48213.",
    "Order 55012873 ships in 3 to 5 business days.",
    "The Quick Start Guide explains every Setting on the Dashboard.",
    "On Monday the Board approved the Budget for Q3.",
    "Revenue grew 12% to $4.5 million in 2023.",
    "Chapter 7 covers Linear Algebra and Calculus.",
    "Press Ctrl+S to save, then choose File > Export.",
    "The meeting moved from 10:30 to 14:00 on 2024-05-17.",
    "Room 204 holds 30 people; Room 310 holds 12.",
    "The Python Package Index hosts the Library.",
    "Our Terms of Service changed on 1 January 2025.",
    "Use the Search box at the top of the Page.",
    "Good Morning! The Weekly Summary is attached.",
    "Step 3: Insert the Battery and close the Cover.",
    "The invoice dated 04/11/2023 totals 1,250.00 EUR.",
    "Thank you for your Feedback on the New Design.",
    "The Spring Sale ends Sunday at Midnight.",
]


NOUNS = ("Report Budget Review Meeting Update Dashboard Settings Account Invoice Summary Roadmap Release Policy "
         "Guide Manual Chapter Section Module Project Team Board Committee Survey Workshop Training Session").split()
ADJECTIVES = "Annual Weekly Quarterly New Final Draft Main Quick Advanced Basic Internal Global Updated".split()


def negative(rng: random.Random) -> str:
    """Text with no PII that looks like it: capitalised common nouns, dates that are no birthdays, numbers."""
    noun, adj = rng.choice(NOUNS), rng.choice(ADJECTIVES)
    if rng.random() < 0.5:
        return rng.choice(NEGATIVES)
    return rng.choice([
        f"The {adj} {noun} is due on {rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(2020, 2026)}.",
        f"Open the {noun} page and click {rng.choice(['Save', 'Export', 'Next', 'Submit'])}.",
        f"Ticket {rng.randint(1000, 99999)} was closed after the {adj} {noun}.",
        f"We moved the {noun} review to {rng.randint(1, 12)}:{rng.choice(['00', '15', '30', '45'])} tomorrow.",
        f"{adj} {noun}: version {rng.randint(1, 9)}.{rng.randint(0, 20)} is out.",
        f"Please read section {rng.randint(1, 12)}.{rng.randint(1, 9)} of the {noun} before Monday.",
    ])


def _luhn_digit(payload: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(payload)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def person(rng: random.Random) -> str:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    style = rng.random()
    if style < 0.15:
        return f"{first} {rng.choice(string.ascii_uppercase)}. {last}"
    if style < 0.25:
        return f"{first} {rng.choice(LAST)}-{last}"
    return f"{first} {last}"


def address(rng: random.Random) -> str:
    number = str(rng.randint(1, 9999)) + (rng.choice("ABC") if rng.random() < 0.1 else "")
    street = f"{rng.choice(STREET_NAMES)} {rng.choice(STREET_TYPES)}"
    if rng.random() < 0.2:
        street = f"{rng.choice(STREET_NAMES)} {rng.choice(STREET_NAMES)} {rng.choice(STREET_TYPES)}"
    style = rng.random()
    if style < 0.45:
        city, state = rng.choice(US_CITIES)
        unit = f", Apt {rng.randint(1, 40)}" if rng.random() < 0.25 else ""
        return f"{number} {street}{unit}, {city}, {state} {_digits(rng, 5)}"
    if style < 0.8:
        city = rng.choice(UK_CITIES)
        postcode = (f"{rng.choice(['SW', 'NW', 'M', 'LS', 'BS', 'G', 'CF', 'EH'])}{rng.randint(1, 20)} "
                    f"{rng.randint(1, 9)}{rng.choice('ABDEFGHJLNPQRSTUWXYZ')}{rng.choice('ABDEFGHJLNPQRSTUWXYZ')}")
        flat = f"Flat {rng.randint(1, 12)}, " if rng.random() < 0.2 else ""
        return f"{flat}{number} {street}, {city} {postcode}"
    if style < 0.9:
        return f"{number} {street}"
    return (f"{rng.choice(['Haupt', 'Linden', 'Berg', 'Garten', 'Schiller'])}straße {rng.randint(1, 120)}, "
            f"{_digits(rng, 5)} {rng.choice(['Berlin', 'Hamburg', 'Köln', 'Leipzig'])}")


def organisation(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return rng.choice(ORGS_KNOWN)
    return f"{rng.choice(ORG_HEADS)} {rng.choice(ORG_TAILS)} {rng.choice(ORG_SUFFIXES)}"


def birth_date(rng: random.Random) -> str:
    y, m, d = rng.randint(1940, 2010), rng.randint(1, 12), rng.randint(1, 28)
    return rng.choice([f"{d} {MONTHS[m - 1]} {y}", f"{MONTHS[m - 1]} {d}, {y}", f"{m:02d}/{d:02d}/{y}",
                       f"{y}-{m:02d}-{d:02d}", f"{d}.{m}.{y}"])


def phone(rng: random.Random) -> str:
    return rng.choice([
        f"({rng.randint(201, 989)}) {rng.randint(200, 999)}-{_digits(rng, 4)}",
        f"{rng.randint(201, 989)}-{rng.randint(200, 999)}-{_digits(rng, 4)}",
        f"+1 {rng.randint(201, 989)} {rng.randint(200, 999)} {_digits(rng, 4)}",
        f"+44 20 7{_digits(rng, 3)} {_digits(rng, 4)}", f"020 7{_digits(rng, 3)} {_digits(rng, 4)}",
        f"07700 900{_digits(rng, 3)}", f"+49 30 {_digits(rng, 8)}", f"+33 1 {_digits(rng, 2)} {_digits(rng, 2)} "
        f"{_digits(rng, 2)} {_digits(rng, 2)}", f"+91 98{_digits(rng, 3)} {_digits(rng, 5)}",
    ])


def card(rng: random.Random) -> str:
    prefix, length, groups = rng.choice([
        ("4", 16, (4, 4, 4, 4)), ("51", 16, (4, 4, 4, 4)), ("2221", 16, (4, 4, 4, 4)), ("37", 15, (4, 6, 5)),
        ("34", 15, (4, 6, 5)), ("6011", 16, (4, 4, 4, 4)), ("3530", 16, (4, 4, 4, 4)), ("4", 19, (4, 4, 4, 4, 3)),
        ("62", 19, (4, 4, 4, 4, 3)), ("36", 14, (4, 6, 4)), ("4", 13, (4, 4, 5)),
    ])
    payload = prefix + _digits(rng, length - len(prefix) - 1)
    number = payload + _luhn_digit(payload)
    sep = rng.choice([" ", "-", ""])
    out, i = [], 0
    for g in groups:
        out.append(number[i:i + g])
        i += g
    return sep.join(out)


def iban(rng: random.Random) -> str:
    country, bban = rng.choice([("DE", _digits(rng, 18)), ("GB", "WEST" + _digits(rng, 14)),
                                ("FR", _digits(rng, 23)), ("NL", "ABNA" + _digits(rng, 10))])
    numeric = "".join(str(int(c, 36)) for c in bban + country + "00")
    check = 98 - int(numeric) % 97
    value = f"{country}{check:02d}{bban}"
    return " ".join(value[i:i + 4] for i in range(0, len(value), 4)) if rng.random() < 0.5 else value


def ssn(rng: random.Random) -> str:
    return f"{rng.randint(100, 665)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}"


def email(rng: random.Random) -> str:
    return f"{rng.choice(FIRST).lower()}.{rng.choice(LAST).lower().replace(chr(39), '')}@{rng.choice(['example.com', 'mail.test', 'corp.example.org'])}"


def ip(rng: random.Random) -> str:
    return ".".join(str(rng.randint(1, 254)) for _ in range(4))


MAKERS = {
    "person": (person, SENT_PERSON), "address": (address, SENT_ADDRESS), "location": (lambda r: r.choice(PLACES), SENT_LOCATION),
    "organisation": (organisation, SENT_ORG), "date_of_birth": (birth_date, SENT_DOB),
    "phone": (phone, SENT_PATTERN["phone"]), "email": (email, SENT_PATTERN["email"]),
    "credit_card": (card, SENT_PATTERN["credit_card"]), "iban": (iban, SENT_PATTERN["iban"]),
    "us_ssn": (ssn, SENT_PATTERN["us_ssn"]), "ip_address": (ip, SENT_PATTERN["ip_address"]),
}
WEIGHTS = {"person": 5, "address": 4, "location": 2, "organisation": 2, "date_of_birth": 2, "phone": 2,
           "email": 1, "credit_card": 2, "iban": 1, "us_ssn": 1, "ip_address": 1}


def make(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    kinds = [k for k, w in WEIGHTS.items() for _ in range(w)]
    out = []
    for _ in range(n):
        parts: list[tuple[str, str | None, str | None]] = []  # (template, value, kind)
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.3:
                parts.append((negative(rng), None, None))
            else:
                kind = rng.choice(kinds)
                maker, templates = MAKERS[kind]
                parts.append((rng.choice(templates), maker(rng), kind))
        text, spans = "", []
        for template, value, kind in parts:
            if text:
                text += rng.choice([" ", " ", "\n"])
            if value is None:
                text += template
                continue
            before, after = template.split("{}")
            start = len(text) + len(before)
            text += before + value + after
            spans.append({"start": start, "end": start + len(value), "kind": kind})
        out.append({"text": text, "spans": spans})
    return out


def score(path: Path, patterns_only: bool) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from appliance.policy.guardrails.pii import PiiDetector

    entities = None
    if not patterns_only:
        from appliance.policy.guardrails.ner import load_entity_detector

        entities = load_entity_detector()
    detector = PiiDetector(entities=entities)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    detector.find("warm up John Smith in London.")
    gold_n, found_n, masked_n, pred_n, pred_ok = Counter(), Counter(), Counter(), Counter(), Counter()
    total_chars, elapsed = 0, 0.0
    for row in rows:
        text = row["text"]
        t0 = time.perf_counter()
        found = detector.find(text)
        elapsed += time.perf_counter() - t0
        total_chars += len(text.encode())
        gold = row["spans"]
        for g in gold:
            gold_n[g["kind"]] += 1
            if any(f.kind == g["kind"] and f.start < g["end"] and g["start"] < f.end for f in found):
                found_n[g["kind"]] += 1
            covered = sum(1 for i in range(g["start"], g["end"]) if any(f.start <= i < f.end for f in found))
            if covered >= 0.9 * (g["end"] - g["start"]):
                masked_n[g["kind"]] += 1
        for f in found:
            pred_n[f.kind] += 1
            if any(f.kind == g["kind"] and f.start < g["end"] and g["start"] < f.end for g in gold):
                pred_ok[f.kind] += 1
    print(f"{len(rows)} texts, {sum(gold_n.values())} labelled values, {total_chars / 1024:.1f} KB")
    print(f"{'kind':<15}{'gold':>6}{'recall':>9}{'precision':>11}{'masked':>9}{'findings':>10}")
    for kind in sorted(set(gold_n) | set(pred_n)):
        rec = found_n[kind] / gold_n[kind] if gold_n[kind] else float("nan")
        prec = pred_ok[kind] / pred_n[kind] if pred_n[kind] else float("nan")
        masked = masked_n[kind] / gold_n[kind] if gold_n[kind] else float("nan")
        print(f"{kind:<15}{gold_n[kind]:>6}{rec:>9.3f}{prec:>11.3f}{masked:>9.3f}{pred_n[kind]:>10}")
    print(f"{elapsed * 1000 / (total_chars / 1024):.1f} ms per KB, {elapsed * 1000 / len(rows):.1f} ms per text "
          f"({elapsed:.2f} s in all, one thread)")
    # The same text as 4 KB documents: what a long document or a retrieved chunk costs.
    docs, doc = [], ""
    for row in rows:
        doc += row["text"] + "\n"
        if len(doc) >= 4096:
            docs.append(doc)
            doc = ""
    if not docs:
        return
    t0 = time.perf_counter()
    for doc in docs:
        detector.find(doc)
    long_elapsed = time.perf_counter() - t0
    kb = sum(len(d.encode()) for d in docs) / 1024
    print(f"{long_elapsed * 1000 / kb:.1f} ms per KB as {len(docs)} documents of ~4 KB")


_MARK = re.compile(r"\[\[([a-z_]+)\|(.+?)\]\]")


def parse_marked(line: str) -> dict:
    """One line with PII marked inline as [[kind|value]] ("\\n" for a line break) as a JSONL row."""
    line = line.replace("\\n", "\n")
    text, spans, pos = "", [], 0
    for m in _MARK.finditer(line):
        text += line[pos:m.start()]
        spans.append({"start": len(text), "end": len(text) + len(m.group(2)), "kind": m.group(1)})
        text += m.group(2)
        pos = m.end()
    return {"text": text + line[pos:], "spans": spans}


def stream_check(path: Path, docs: int) -> None:
    """Streamed masking against whole-text masking: documents of 4 texts each, fed in 4-character pieces
    and at random split points, with the default kinds and with every kind."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from appliance.policy.guardrails.masking import MaskSession, StreamMasker
    from appliance.policy.guardrails.ner import load_entity_detector
    from appliance.policy.guardrails.pii import DEFAULT_KINDS, PiiDetector

    detector = PiiDetector(entities=load_entity_detector())
    rows = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    texts = [" ".join(rows[i:i + 4]) for i in range(0, min(len(rows), 4 * docs), 4)]
    rng = random.Random(5)
    for name, kinds in (("default kinds", DEFAULT_KINDS), ("every kind", detector.kinds)):
        same = runs = 0
        for text in texts:
            expected = MaskSession().apply(text, detector.find(text, kinds))
            for cuts in (list(range(rng.randint(2, 5), len(text), 4)),
                         sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(5, 60))))):
                masker = StreamMasker(detector, kinds=kinds)
                bounds = [0, *cuts, len(text)]
                got = "".join(masker.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])) + masker.flush()
                runs += 1
                same += got == expected
        print(f"{name}: streamed == whole-text masking in {same} of {runs} streams ({len(texts)} documents)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make")
    m.add_argument("--seed", type=int, default=1)
    m.add_argument("--n", type=int, default=600)
    m.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("score")
    s.add_argument("path", type=Path)
    s.add_argument("--patterns-only", action="store_true", help="without the named-entity detector")
    v = sub.add_parser("convert", help="texts with PII marked inline as [[kind|value]] (tests/data) to JSONL")
    v.add_argument("marked", type=Path)
    v.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("stream", help="check streamed masking against whole-text masking")
    c.add_argument("path", type=Path)
    c.add_argument("--docs", type=int, default=100)
    args = parser.parse_args()
    if args.command == "make":
        rows = make(args.seed, args.n)
        args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"wrote {len(rows)} texts to {args.out}")
    elif args.command == "convert":
        rows = [parse_marked(line.rstrip("\n")) for line in args.marked.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
        args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"wrote {len(rows)} texts to {args.out}")
    elif args.command == "stream":
        stream_check(args.path, args.docs)
    else:
        score(args.path, args.patterns_only)


if __name__ == "__main__":
    main()
