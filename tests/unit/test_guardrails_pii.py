"""PII and secret detection with validation, placeholder masking, and masking while streaming."""

from __future__ import annotations

import random
import time

import msgspec
import pytest

from appliance.policy.guardrails import MaskSession, PiiDetector, PiiFinding, StreamMasker, mask, redact_text, unmask
from appliance.policy.guardrails.synthetic import pii_samples

DETECTOR = PiiDetector()


def kinds(text: str) -> list[tuple[str, str]]:
    return [(f.kind, text[f.start:f.end]) for f in DETECTOR.find(text)]


def test_card_numbers_need_luhn_and_a_known_issuer() -> None:
    assert kinds("card 4111 1111 1111 1111 exp 12/27") == [("credit_card", "4111 1111 1111 1111")]
    assert kinds("amex 3782-822463-10005.") == [("credit_card", "3782-822463-10005")]
    assert kinds("pay 5555555555554444 now") == [("credit_card", "5555555555554444")]
    assert kinds("card 4111 1111 1111 1112") == []  # Luhn fails
    assert kinds("ref 1234 5678 9012 3452") == []  # Luhn passes, but no issuer starts with 1
    two = kinds("cards 4111 1111 1111 1111 5555 5555 5555 4444 on file")
    assert [v for _, v in two] == ["4111 1111 1111 1111", "5555 5555 5555 4444"]


def test_iban_needs_its_mod97_checksum() -> None:
    assert kinds("IBAN DE89 3704 0044 0532 0130 00 please") == [("iban", "DE89 3704 0044 0532 0130 00")]
    assert kinds("to GB82WEST12345698765432.") == [("iban", "GB82WEST12345698765432")]
    assert kinds("IBAN DE88 3704 0044 0532 0130 00") == []  # check digits off by one
    both = kinds("IBAN AT611904300234573201 IBAN GB82 WEST 1234 5698 7654 32 END")
    assert [k for k, _ in both] == ["iban", "iban"]


def test_emails_and_phone_numbers() -> None:
    assert kinds("write to Jane.Doe+news@mail.example.co.uk.") == [("email", "Jane.Doe+news@mail.example.co.uk")]
    assert kinds("not an email: a@b, user@@x.com") == []
    found = kinds("call (415) 555-0132, +44 20 7946 0958 or +49 30 901820 from abroad")
    assert found == [("phone", "(415) 555-0132"), ("phone", "+44 20 7946 0958"), ("phone", "+49 30 901820")]
    # A default region other than the US reads national numbers differently.
    assert [f.kind for f in PiiDetector("GB").find("ring 020 7946 0958")] == ["phone"]


def test_numbers_that_are_not_phones_or_ids() -> None:
    text = ("order #123456789 on 2024-03-15 (15/03/2024) at 12:30:45, ISBN 978-3-16-148410-0, "
            "price $1,234.56, version v1.2.3, build 1.2.3.4, bad address 999.1.1.1, call 123-456-7890, "
            "zip 94105, std::vector<int>, tracking 1Z999AA10123456784")
    assert kinds(text) == []


def test_us_ssn_invalid_ranges_and_keyword_for_bare_numbers() -> None:
    assert kinds("SSN 536-90-4399") == [("us_ssn", "536-90-4399")]
    for bad in ("000-12-3456", "666-12-3456", "912-12-3456", "536-00-4399", "536-90-0000", "078-05-1120"):
        assert kinds(f"SSN {bad}") == [], bad
    assert kinds("my ssn: 536904399") == [("us_ssn", "536904399")]
    assert kinds("order 536904399") == []  # nine bare digits need the keyword right before them


def test_national_ids_checked_by_stdnum() -> None:
    assert kinds("NI number AB 12 34 56 C") == [("uk_nino", "AB 12 34 56 C")]
    assert kinds("NI number BG 12 34 56 C") == []  # BG is never issued
    assert kinds("DNI 12345678Z") == [("es_dni", "12345678Z")]
    assert kinds("DNI 12345678A") == []  # wrong check letter
    assert kinds("NIR 2 95 10 99 126 111 93") == [("fr_nir", "2 95 10 99 126 111 93")]
    assert kinds("CF RCCMNL83S18D969H") == [("it_fiscal_code", "RCCMNL83S18D969H")]
    assert kinds("CF RCCMNL83S18D969X") == []
    assert kinds("Steuer-IdNr.: 36 574 261 809") == [("de_idnr", "36 574 261 809")]
    assert kinds("Kundennummer 36 574 261 809") == []  # eleven digits without the keyword


def test_ip_addresses_v4_and_v6() -> None:
    assert kinds("from 192.168.1.20, then 8.8.8.8.") == [("ip_address", "192.168.1.20"), ("ip_address", "8.8.8.8")]
    assert kinds("host fe80::1ff:fe23:4567:890a and ::ffff:10.0.0.1") == [
        ("ip_address", "fe80::1ff:fe23:4567:890a"), ("ip_address", "::ffff:10.0.0.1")]
    assert kinds("256.1.1.1 and 1.2.3.4.5 and 12:30:45 and 00:1A:2B:3C:4D:5E") == []


def test_secrets() -> None:
    text = (
        "aws AKIAIOSFODNN7EXAMPLE gh ghp_abcdefghijklmnopqrstuvwxyz0123456789 "
        "openai sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8t stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc "
        "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U "
        'api_key = "Zx8#kP2qLm9vR4tYw" Authorization: Bearer 9f8e7d6c5b4a39281706f5e4d3c2b1a0\n'
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA1234567890abcdefABCDEF+/\nabcdef==\n-----END RSA PRIVATE KEY-----\n"
    )
    found = kinds(text)
    assert [k for k, _ in found] == ["secret"] * 8
    assert found[5][1] == "Zx8#kP2qLm9vR4tYw"  # the value, not the key name
    assert found[7][1].startswith("-----BEGIN RSA PRIVATE KEY-----") and found[7][1].endswith("KEY-----")
    # Placeholders and low-entropy values are not secrets.
    assert kinds("api_key = <your-api-key>, password: changeme, token=${API_TOKEN}, secret = xxxxxxxxxxxx") == []
    assert kinds("we use sk-learn and scikit-learn") == []


def test_findings_carry_offsets_not_text() -> None:
    assert [f.name for f in msgspec.structs.fields(PiiFinding)] == ["kind", "start", "end"]
    finding = DETECTOR.find("mail bob@example.com")[0]
    with pytest.raises(AttributeError):
        finding.kind = "x"  # type: ignore[misc]


def test_placeholders_are_consistent_and_the_map_comes_only_when_asked() -> None:
    text = "Bob <bob@example.com> wrote to BOB@example.com and ann@example.com; card 4111-1111-1111-1111 = 4111 1111 1111 1111"
    plain = mask(text, DETECTOR)
    assert plain.text == "Bob <[EMAIL_1]> wrote to [EMAIL_1] and [EMAIL_2]; card [CREDIT_CARD_1] = [CREDIT_CARD_1]"
    assert plain.mapping is None
    reversible = mask(text, DETECTOR, reversible=True)
    assert reversible.text == plain.text
    assert reversible.mapping == {"[EMAIL_1]": "bob@example.com", "[EMAIL_2]": "ann@example.com",
                                  "[CREDIT_CARD_1]": "4111-1111-1111-1111"}
    assert unmask("reply to [EMAIL_2] about [CREDIT_CARD_1] [UNKNOWN_1]", reversible.mapping) == (
        "reply to ann@example.com about 4111-1111-1111-1111 [UNKNOWN_1]")


def test_redact_text_for_logs() -> None:
    assert redact_text("login failed for ann@example.com from 10.0.0.7") == "login failed for [EMAIL_1] from [IP_ADDRESS_1]"


def test_a_session_numbers_placeholders_across_texts() -> None:
    session = MaskSession()
    first = mask("from ann@example.com", DETECTOR, session=session).text
    second = mask("cc bob@example.com and ann@example.com", DETECTOR, session=session).text
    assert (first, second) == ("from [EMAIL_1]", "cc [EMAIL_2] and [EMAIL_1]")
    assert session.counts["email"] == 3


def test_detection_is_fast() -> None:
    prose = ("The committee met on 12 March 2021 in Geneva; 41 delegates from 12 countries attended and "
             "approved 3 resolutions, with 250 observers. ") * 90
    assert len(prose) > 10_000
    DETECTOR.find(prose)
    started = time.process_time()
    for _ in range(5):
        DETECTOR.find(prose)
    assert (time.process_time() - started) / 5 < 0.05  # a few ms normally; 50 ms catches a pathological regex


# --- streaming -----------------------------------------------------------------------------------

EVERY_KIND = (
    "Hi, I'm John (john.doe@example.com). Card 4111 1111 1111 1111 exp 12/27, bad 4111 1111 1111 1112.\n"
    "IBAN DE89 3704 0044 0532 0130 00 and GB82WEST12345698765432. Call (415) 555-0132 or +44 20 7946 0958 ext. 12.\n"
    "SSN 536-90-4399, my ssn: 536904399. NINO AB 12 34 56 C, DNI 12345678Z, NIR 2 95 10 99 126 111 93, "
    "CF RCCMNL83S18D969H, Steuer-IdNr: 36 574 261 809. Server 192.168.1.20 and fe80::1ff:fe23:4567:890a.\n"
    "AWS AKIAIOSFODNN7EXAMPLE, key sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8t, api_key = \"Zx8#kP2qLm9vR4tY\"\n"
    "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\nabcdef==\n-----END PRIVATE KEY-----\n"
    "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U done.\n"
)


def stream(text: str, cuts: list[int], masker: StreamMasker | None = None) -> str:
    masker = masker or StreamMasker(DETECTOR)
    bounds = [0, *cuts, len(text)]
    return "".join(masker.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])) + masker.flush()


def test_stream_masks_values_split_across_chunks() -> None:
    card = "pay 4111 1111 1111 1111 today"
    assert stream(card, [card.index(" 1111") + 5]) == "pay [CREDIT_CARD_1] today"  # "4111 1111" + " 1111 1111"
    email = "mail john.doe@example.com now"
    assert stream(email, [email.index("@") - 2, email.index("@") + 4]) == "mail [EMAIL_1] now"


def test_stream_output_equals_whole_text_masking_at_random_split_points() -> None:
    rng = random.Random(7)
    texts = [EVERY_KIND] + [s.text for s in pii_samples(seed=11, n=30)]
    for text in texts:
        expected = mask(text, DETECTOR).text
        for _ in range(12):
            cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, min(60, len(text) - 1))))
            assert stream(text, cuts) == expected, (text, cuts)


def test_stream_char_by_char() -> None:
    assert stream(EVERY_KIND, list(range(1, len(EVERY_KIND)))) == mask(EVERY_KIND, DETECTOR).text


def test_stream_holds_back_little_plain_text() -> None:
    masker = StreamMasker(DETECTOR)
    words = ("The quick brown fox jumps over the lazy dog and keeps running through the field. " * 20).split(" ")
    emitted = 0
    fed = 0
    for word in words:
        piece = word + " "
        fed += len(piece)
        emitted += len(masker.feed(piece))
        assert fed - emitted <= 64
    assert emitted + len(masker.flush()) == fed


def test_flag_mode_passes_text_and_counts() -> None:
    masker = StreamMasker(DETECTOR, mask_output=False)
    out = masker.feed("write to ann@exa") + masker.feed("mple.com today") + masker.flush()
    assert out == "write to ann@example.com today"
    assert [(a.kind, a.action, a.count) for a in masker.actions()] == [("email", "flag", 1)]
