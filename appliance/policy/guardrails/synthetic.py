"""Seeded synthetic text with labelled PII (valid by construction) and hard negatives, for evaluation
and tests. Card numbers carry a computed Luhn digit, IBANs computed mod-97 check digits, national ids
their computed check characters; hard negatives are near misses (bad checksums, dates, versions...)."""

from __future__ import annotations

import base64
import json
import random
import string

import msgspec
import phonenumbers
from phonenumbers import PhoneNumberFormat, PhoneNumberType
from stdnum import iban as std_iban
from stdnum.de import idnr as std_de_idnr
from stdnum.fr import nir as std_fr_nir
from stdnum.it import codicefiscale as std_it_cf
from stdnum.iso7064 import mod_11_10
from stdnum.us import ssn as std_us_ssn

from appliance.policy.guardrails.pii import luhn_valid
from appliance.policy.guardrails.types import PiiFinding


class PiiSample(msgspec.Struct, frozen=True):
    text: str
    spans: tuple[PiiFinding, ...]
    """Gold PII in the text."""
    hard_negatives: int = 0
    """Near-miss values in the text that must not be reported."""


_FIRST = ["anna", "john", "li", "maria", "oluwaseun", "sven", "fatima", "hiro", "chloe", "pedro", "ines", "raj"]
_LAST = ["smith", "garcia", "nguyen", "mueller", "okafor", "rossi", "tanaka", "dubois", "kowalski", "patel"]
_DOMAINS = ["example.com", "mail.example.org", "uni-berlin.de", "corp.example.co.uk", "startup.io", "post.fr"]
_FILLER = [
    "Thanks for getting back to me so quickly.", "The meeting moved to Thursday afternoon.",
    "Our team shipped 3 releases in Q2 and closed 41 tickets.", "See the attached minutes from the review.",
    "The warehouse in Lyon reported 12 delayed parcels.", "Let me know if anything is unclear.",
    "Revenue grew 8.5% year over year.", "The river is about 1,230 km long.",
    "Room 4B is booked from 10:00 to 11:30.", "We expect 250 attendees at the conference.",
]
_B62 = string.ascii_letters + string.digits
_CARD_BRANDS = [("4", 16), ("4", 13), ("51", 16), ("55", 16), ("2221", 16), ("34", 15), ("37", 15),
                ("6011", 16), ("65", 16), ("3530", 16), ("36", 14)]
_IBAN_BBAN = {  # country: BBAN structure, n = digits, a = upper letters, c = alphanumerics
    "DE": "8n10n", "GB": "4a6n8n", "NL": "4a10n", "FR": "5n5n11n2n", "CH": "5n12n", "IT": "1a5n5n12n",
    "AT": "5n11n", "PL": "8n16n", "IE": "4a6n8n", "SE": "3n17n",
}
_PHONE_REGIONS = ["US", "US", "GB", "DE", "FR", "IN", "BR", "JP", "AU", "ES", "IT", "CA"]


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + _digits(rng, length - len(prefix) - 1)
    for d in string.digits:
        if luhn_valid(body + d):
            return body + d
    raise AssertionError("unreachable")


def credit_card(rng: random.Random) -> str:
    prefix, length = rng.choice(_CARD_BRANDS)
    number = _luhn_complete(prefix, length, rng)
    style = rng.randrange(3)
    if style == 0:
        return number
    sep = " " if style == 1 else "-"
    if length == 15:
        return sep.join((number[:4], number[4:10], number[10:]))
    return sep.join(number[i:i + 4] for i in range(0, length, 4))


def _bban(rng: random.Random, structure: str) -> str:
    out, num = [], ""
    for ch in structure:
        if ch.isdigit():
            num += ch
            continue
        n, num = int(num), ""
        pool = {"n": string.digits, "a": string.ascii_uppercase, "c": string.ascii_uppercase + string.digits}[ch]
        out.append("".join(rng.choice(pool) for _ in range(n)))
    return "".join(out)


def _iban_check(country: str, bban: str) -> str:
    number = int("".join(str(int(c, 36)) for c in bban + country + "00"))
    return f"{98 - number % 97:02d}"


def iban(rng: random.Random) -> str:
    while True:
        country = rng.choice(sorted(_IBAN_BBAN))
        bban = _bban(rng, _IBAN_BBAN[country])
        value = country + _iban_check(country, bban) + bban
        if std_iban.is_valid(value):
            return std_iban.format(value) if rng.random() < 0.6 else value


def email(rng: random.Random) -> str:
    local = rng.choice(_FIRST) + rng.choice([".", "_", "", "+news."]) + rng.choice(_LAST)
    if rng.random() < 0.4:
        local += str(rng.randrange(1, 99))
    return f"{local}@{rng.choice(_DOMAINS)}"


def phone(rng: random.Random) -> str:
    while True:
        region = rng.choice(_PHONE_REGIONS)
        kind = rng.choice([PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE])
        example = phonenumbers.example_number_for_type(region, kind)
        if example is None:
            continue
        national = str(example.national_number)
        keep = max(3, len(national) - 4)
        number = phonenumbers.parse(f"+{example.country_code}{national[:keep]}{_digits(rng, len(national) - keep)}")
        if not phonenumbers.is_valid_number(number):
            continue
        if region == "US" and rng.random() < 0.6:
            n = str(number.national_number)
            return rng.choice([f"({n[:3]}) {n[3:6]}-{n[6:]}", f"{n[:3]}-{n[3:6]}-{n[6:]}", f"{n[:3]}.{n[3:6]}.{n[6:]}"])
        return phonenumbers.format_number(number, rng.choice([PhoneNumberFormat.INTERNATIONAL, PhoneNumberFormat.E164]))


def us_ssn(rng: random.Random) -> str:
    while True:
        value = f"{rng.randrange(1, 900):03d}-{rng.randrange(1, 100):02d}-{rng.randrange(1, 10000):04d}"
        if std_us_ssn.is_valid(value):
            return value


def uk_nino(rng: random.Random) -> str:
    while True:
        prefix = rng.choice("ABCEGHJKLMNOPRSTWXYZ") + rng.choice("ABCEGHJKLMNPRSTWXYZ")
        if prefix not in {"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"}:
            break
    d = _digits(rng, 6)
    suffix = rng.choice("ABCD")
    return f"{prefix} {d[:2]} {d[2:4]} {d[4:]} {suffix}" if rng.random() < 0.5 else f"{prefix}{d}{suffix}"


def es_dni(rng: random.Random) -> str:
    n = rng.randrange(10_000_000, 100_000_000)
    return f"{n}{'TRWAGMYFPDXBNJZSQVHLCKE'[n % 23]}"


def fr_nir(rng: random.Random) -> str:
    dept = rng.choice([d for d in range(1, 96) if d != 20])
    body = (f"{rng.choice('12')}{rng.randrange(100):02d}{rng.randrange(1, 13):02d}{dept:02d}"
            f"{rng.randrange(1, 990):03d}{rng.randrange(1, 1000):03d}")
    value = body + std_fr_nir.calc_check_digits(body)
    assert std_fr_nir.is_valid(value)
    if rng.random() < 0.5:
        return value
    return " ".join((value[0], value[1:3], value[3:5], value[5:7], value[7:10], value[10:13], value[13:]))


def it_fiscal_code(rng: random.Random) -> str:
    letters = "".join(rng.choice(string.ascii_uppercase) for _ in range(6))
    body = (f"{letters}{rng.randrange(100):02d}{rng.choice('ABCDEHLMPRST')}{rng.randrange(1, 29) + rng.choice((0, 40)):02d}"
            f"{rng.choice(string.ascii_uppercase)}{rng.randrange(1, 1000):03d}")
    value = body + std_it_cf.calc_check_digit(body)
    assert std_it_cf.is_valid(value), value
    return value


def de_idnr(rng: random.Random) -> str:
    while True:
        body = str(rng.randrange(1, 10)) + _digits(rng, 9)
        value = body + mod_11_10.calc_check_digit(body)
        if std_de_idnr.is_valid(value):
            return value if rng.random() < 0.5 else f"{value[:2]} {value[2:5]} {value[5:8]} {value[8:]}"


def ip_address(rng: random.Random) -> str:
    if rng.random() < 0.6:
        first = rng.choice([10, 172, 192, 8, 34, 52, 81, 203])
        return f"{first}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    groups = [f"{rng.randrange(65536):x}" for _ in range(8)]
    if rng.random() < 0.5:
        return ":".join(groups)
    return f"{groups[0]}:{groups[1]}::{groups[6]}:{groups[7]}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def secret(rng: random.Random) -> str:
    def rand(n: int, pool: str = _B62) -> str:
        return "".join(rng.choice(pool) for _ in range(n))

    choice = rng.randrange(9)
    if choice == 0:
        return "AKIA" + rand(16, string.ascii_uppercase + string.digits)
    if choice == 1:
        return "ghp_" + rand(36)
    if choice == 2:
        return "sk-proj-" + rand(40)
    if choice == 3:
        return "sk_live_" + rand(24)
    if choice == 4:
        return "xoxb-" + _digits(rng, 11) + "-" + rand(24)
    if choice == 5:
        return "AIza" + rand(35, _B62 + "-_")
    if choice == 6:
        header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = _b64url(json.dumps({"sub": _digits(rng, 8), "iat": rng.randrange(1_600_000_000, 1_800_000_000)}).encode())
        return f"{header}.{payload}.{_b64url(rng.randbytes(32))}"
    if choice == 7:
        body = base64.b64encode(rng.randbytes(144)).decode()
        lines = "\n".join(body[i:i + 64] for i in range(0, len(body), 64))
        return f"-----BEGIN PRIVATE KEY-----\n{lines}\n-----END PRIVATE KEY-----"
    return rand(rng.randrange(20, 41), _B62 + "_-")  # a bare value, labelled below by its assignment


_LABELS = {
    "email": ["Contact: {}", "reach me at {}", "cc {} on the thread", "Email {} for access"],
    "credit_card": ["card number {}", "paid with {} yesterday", "CC: {}", "charge {} for the order"],
    "iban": ["IBAN {}", "transfer to {} by Friday", "account {}"],
    "phone": ["call {}", "Tel. {}", "my number is {}", "ring {} after 6pm"],
    "us_ssn": ["SSN {}", "social security number {}", "her number is {} on the form"],
    "uk_nino": ["NI number {}", "National Insurance: {}"],
    "es_dni": ["DNI {}", "documento {}"],
    "fr_nir": ["numéro de sécurité sociale {}", "NIR {}"],
    "it_fiscal_code": ["codice fiscale {}", "CF {}"],
    "de_idnr": ["Steuer-IdNr.: {}", "steuerliche Identifikationsnummer {}"],
    "ip_address": ["server at {}", "login from {}", "ping {} to check"],
    "secret": ["token {}", "key {}", "{}"],
}
_GENERATORS = {
    "email": email, "credit_card": credit_card, "iban": iban, "phone": phone, "us_ssn": us_ssn, "uk_nino": uk_nino,
    "es_dni": es_dni, "fr_nir": fr_nir, "it_fiscal_code": it_fiscal_code, "de_idnr": de_idnr,
    "ip_address": ip_address, "secret": secret,
}


def hard_negative(rng: random.Random) -> str:
    """A value that looks like PII and is not: bad checksums, dates, versions, prices, ids..."""
    choice = rng.randrange(16)
    if choice == 0:  # 16 digits failing Luhn
        number = _luhn_complete("4", 16, rng)
        bad = number[:-1] + str((int(number[-1]) + rng.randrange(1, 10)) % 10)
        return f"card {' '.join(bad[i:i + 4] for i in range(0, 16, 4))}"
    if choice == 1:  # IBAN with wrong check digits
        value = iban(rng).replace(" ", "")
        check = rng.choice([c for c in range(2, 99) if c != int(value[2:4])])
        return f"IBAN {value[:2]}{check:02d}{value[4:]}"
    if choice == 2:
        return f"SSN {rng.choice(['000', '666', '900', '987'])}-{rng.randrange(1, 100):02d}-{rng.randrange(1, 10000):04d}"
    if choice == 3:
        return f"order #{_digits(rng, 9)}"
    if choice == 4:
        return f"on {rng.randrange(2000, 2030)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
    if choice == 5:
        return f"due {rng.randrange(1, 29):02d}/{rng.randrange(1, 13):02d}/{rng.randrange(2000, 2030)}"
    if choice == 6:
        return f"version v{rng.randrange(10)}.{rng.randrange(20)}.{rng.randrange(50)}"
    if choice == 7:
        return f"address {rng.randrange(256, 999)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
    if choice == 8:
        return "ISBN 978-3-16-148410-0" if rng.random() < 0.5 else f"ISBN 978-0-{_digits(rng, 3)}-{_digits(rng, 5)}-{rng.randrange(10)}"
    if choice == 9:
        return f"price ${rng.randrange(1, 9)},{_digits(rng, 3)}.{_digits(rng, 2)}"
    if choice == 10:
        return f"at {rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}"
    if choice == 11:
        return f"tracking 1Z{_digits(rng, 3)}AA1{_digits(rng, 8)}"
    if choice == 12:
        return f"commit {rng.randbytes(20).hex()}"
    if choice == 13:
        return rng.choice(["api_key = <your-api-key>", "password: changeme", "token=${API_TOKEN}", "secret = xxxxxxxxxxxx"])
    if choice == 14:
        return f"call {rng.choice(['123', '011', '099'])}-{_digits(rng, 3)}-{_digits(rng, 4)}"  # no such area code
    return f"id {rng.randrange(10_000_000, 100_000_000)}"


def pii_samples(seed: int = 0, n: int = 500) -> list[PiiSample]:
    """n texts; each holds 1 to 3 labelled values (every kind in turn) and 0 to 2 hard negatives."""
    rng = random.Random(seed)
    kinds = sorted(_GENERATORS)
    samples: list[PiiSample] = []
    turn = 0
    for _ in range(n):
        parts: list[tuple[str, tuple[str, str] | None]] = []
        for _ in range(rng.randint(1, 3)):
            kind = kinds[turn % len(kinds)]
            turn += 1
            value = _GENERATORS[kind](rng)
            if kind == "secret" and not value.startswith(("AKIA", "ghp_", "sk", "xox", "AIza", "eyJ", "-----")):
                label = rng.choice(["api_key = {}", "client_secret: '{}'", "Authorization: Bearer {}"])
            else:
                label = rng.choice(_LABELS[kind])
            parts.append((label, (kind, value)))
        negatives = rng.randint(0, 2)
        parts += [(hard_negative(rng), None) for _ in range(negatives)]
        parts += [(rng.choice(_FILLER), None) for _ in range(rng.randint(1, 3))]
        rng.shuffle(parts)
        text, spans = "", []
        for label, item in parts:
            if text:
                text += rng.choice([" ", "\n", " - "])
            if item is None:
                text += label
                continue
            kind, value = item
            before, after = label.split("{}")
            text += before
            spans.append(PiiFinding(kind, len(text), len(text) + len(value)))
            text += value + after + rng.choice([".", "", ",", ";"])
        samples.append(PiiSample(text=text, spans=tuple(spans), hard_negatives=negatives))
    return samples
