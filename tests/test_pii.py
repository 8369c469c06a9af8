"""Personal data: the detectors on planted values, the domain setting at ingest, in monitoring and in serving,
and end to end: a training file with planted e-mails, phone numbers, card numbers, IBANs and an account number
goes through the real pipeline and a real server, and no planted value is anywhere afterwards.

Why the planted values are checked for in raw bytes of every file: the places a value could leak to are many
and change with the code (datasets, run folders, Prefect's database with its logs and artifacts, the results
folder, the registry with its retrieval index, the service's logs); a search of the bytes finds it wherever
it went, in whatever format, without this test knowing where to look.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path

import httpx
import pytest

from domainflow.catalog import get_domain, register
from domainflow.data.dataset import ingest_dataset, read_ingest_report
from domainflow.monitoring.batch import BatchValidationError, read_batch
from domainflow.monitoring.topics import TopicExtractor
from domainflow.pii import PiiRejectedError, mask, protect
from domainflow.registry import ModelRegistry
from domainflow.spec import DataSlice
from serving import ApiKeys, ServingConfig, create_app
from tests.conftest import TINY_LABELS
from tests.data_helpers import banking77_slice, replace, write_csv
from tests.process_helpers import ThreadedUvicorn

DATA = Path(__file__).resolve().parent.parent / "data"
KEY = "pii-test-key-3c9e1a7f"

# ------------------------------------------------------------------------------------ the detectors

VALID_CARDS = [
    "4539 5781 2345 6789",  # Visa, groups of four
    "5500-0000-0000-0004",  # Mastercard, dashes
    "371449635398431",  # Amex, 15 digits in one run
    "6011000990139424",  # Discover
]
LUHN_INVALID = ["4539 5781 2345 6784", "5500-0000-0000-0005", "1234567812345678"]
VALID_IBANS = ["DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432", "fr14 2004 1010 0505 0001 3m02 606"]
INVALID_IBANS = ["DE89 3704 0044 0532 0130 01", "GB83WEST12345698765432"]
PHONES = ["+44 7911 123456", "020 7946 0018", "(212) 555-0123", "+1-202-555-0143", "+49 30 901820", "0044 7911 123456"]
EMAILS = ["jane.doe@example.com", "o'brien+bank@mail.example.co.uk", "ÅSA.öberg@exempel.se"]
#: Numbers customers write that are no personal data: they must come through unchanged.
NOT_PII = [
    "my card ending 1234 was declined",
    "I typed my PIN 4321 three times",
    "I was charged £1200.50 on 12/03/2019 instead of 1,200",
    "it has been 2 weeks and 3 days",
    "Mesa Royalty Trust declares $0.036724557 dividend",
    "RoboSense Obtains IATF 16949 Certification",
    "Grupa LOTOS S A : Report no. 38/2019",
    "$ES equilibrium is 3107.50-3108  Long if either open is above 3108",
    "RT @trader: $AAPL up 3% at 10:45",
    "my reference is 1234 5678 9012",
]


def only(text: str) -> dict[str, int]:
    """How many values of each kind are masked in ``text``."""
    return dict(mask(text).counts)


PLANTED_IN_SENTENCES = [
    *(("CARD_NUMBER", card) for card in VALID_CARDS),
    *(("IBAN", iban) for iban in VALID_IBANS),
    *(("PHONE_NUMBER", phone) for phone in PHONES),
    *(("EMAIL", email) for email in EMAILS),
]


@pytest.mark.parametrize(("kind", "value"), PLANTED_IN_SENTENCES)
def test_each_kind_is_replaced_by_its_placeholder_and_the_words_around_it_kept(kind: str, value: str) -> None:
    """A word after the value ("THANKS": letters an IBAN's pattern would take too) and an @handle stay."""
    masked = mask(f"please use {value} THANKS, not @support after 5")
    assert masked.text == f"please use <{kind}> THANKS, not @support after 5"
    assert masked.counts == {kind: 1}


@pytest.mark.parametrize("number", LUHN_INVALID)
def test_a_luhn_invalid_number_is_not_a_card(number: str) -> None:
    """Same length and layout as a card number, one digit off: not a card, so not masked as one."""
    assert "CARD_NUMBER" not in only(f"order {number} has not arrived")


def test_two_cards_in_one_run_of_digits_are_two_cards() -> None:
    masked = mask(f"{VALID_CARDS[0]} {VALID_CARDS[1].replace('-', ' ')}")
    assert masked.text == "<CARD_NUMBER> <CARD_NUMBER>" and masked.counts == {"CARD_NUMBER": 2}


@pytest.mark.parametrize("iban", INVALID_IBANS)
def test_an_iban_with_wrong_check_digits_is_not_an_iban(iban: str) -> None:
    assert "IBAN" not in only(f"IBAN {iban}")


def test_account_numbers_need_their_context() -> None:
    assert mask("my account number is 31926819").text == "my account number is <ACCOUNT_NUMBER>"
    assert mask("acct no. 1234-5678-90 sort code 12-34-56").text == "acct no. <ACCOUNT_NUMBER> sort code 12-34-56"
    assert mask("parcel 31926819 is late").counts == {}  # a bare number could be anything


@pytest.mark.parametrize("text", NOT_PII)
def test_amounts_dates_pins_and_references_are_left_alone(text: str) -> None:
    assert mask(text).text == text


def test_a_text_with_every_kind_is_masked_once_per_value() -> None:
    text = (
        f"I'm jane.doe@example.com, card {VALID_CARDS[0]}, IBAN {VALID_IBANS[0]}, account number 730192648815, "
        f"phone {PHONES[0]}"
    )
    masked = mask(text)
    assert masked.text == (
        "I'm <EMAIL>, card <CARD_NUMBER>, IBAN <IBAN>, account number <ACCOUNT_NUMBER>, phone <PHONE_NUMBER>"
    )
    assert masked.counts == {"EMAIL": 1, "IBAN": 1, "CARD_NUMBER": 1, "ACCOUNT_NUMBER": 1, "PHONE_NUMBER": 1}


def test_the_modes() -> None:
    texts = ["my card has not arrived", f"card {VALID_CARDS[0]} and {EMAILS[0]}", 7]  # a non-text passes as is
    where = ["line 2", "line 3", "line 4"]
    assert protect("off", texts, where, "f.csv").texts == texts
    masked = protect("mask", texts, where, "f.csv")
    assert masked.texts == ["my card has not arrived", "card <CARD_NUMBER> and <EMAIL>", 7]
    assert masked.counts == {"EMAIL": 1, "CARD_NUMBER": 1}
    with pytest.raises(PiiRejectedError) as refused:
        protect("reject", texts, where, "f.csv, column 'text'")
    message = str(refused.value)
    assert "f.csv, column 'text'" in message and "line 3 (EMAIL, CARD_NUMBER)" in message
    assert "line 2" not in message and VALID_CARDS[0] not in message and EMAILS[0] not in message


def _shipped_texts(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [row["text"] for row in csv.DictReader(handle)]


def test_the_shipped_datasets_lose_nothing_to_masking() -> None:
    """Banking77 (13,083 texts: few digits) and the financial news (11,931: prices, dates, tickers, report
    numbers) hold no personal data; a detector that masks any of their texts has become too eager. (With phone
    leniency VALID instead of STRICT_GROUPING, the price range "3107.50-3108" of one headline was a phone.)"""
    found: Counter[str] = Counter()
    total = 0
    for path in (
        "banking77/train.csv",
        "banking77/test.csv",
        "twitter_financial_news_sentiment/train.csv",
        "twitter_financial_news_sentiment/valid.csv",
    ):
        texts = _shipped_texts(DATA / path)
        total += len(texts)
        found.update(protect("mask", texts, [""] * len(texts), path).counts)
    assert total == 13083 + 11931
    assert found == Counter()


# ------------------------------------------------------------------------------------ ingest and monitoring


def _slice(pii: str = "mask") -> DataSlice:
    return DataSlice(
        text_column="text",
        label_column="category",
        label_names=tuple(TINY_LABELS),
        validation_fraction=0.1,
        min_examples_per_class=3,
        min_test_rows=5,
        pii=pii,
    )


def test_reject_stops_ingest_naming_file_line_and_kind(tmp_path: Path) -> None:
    train = banking77_slice("train", TINY_LABELS, 5)
    train[2]["text"] += f" my card is {VALID_CARDS[0]}"  # line 4: the header is line 1
    train[6]["text"] += f" call {PHONES[0]} or {EMAILS[0]}"  # line 8
    write_csv(tmp_path / "train.csv", train)
    write_csv(tmp_path / "test.csv", banking77_slice("test", TINY_LABELS, 2))
    with pytest.raises(PiiRejectedError) as refused:
        ingest_dataset(
            _slice("reject"),
            "pii",
            tmp_path / "out",
            train_path=tmp_path / "train.csv",
            test_path=tmp_path / "test.csv",
        )
    message = str(refused.value)
    assert message.startswith("train.csv, column 'text': personal data in 2 text(s)")
    assert "line 4 (CARD_NUMBER)" in message and "line 8 (EMAIL, PHONE_NUMBER)" in message
    for value in (VALID_CARDS[0], PHONES[0], EMAILS[0]):
        assert value not in message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing written


def test_the_pii_setting_is_part_of_the_dataset_key(tmp_path: Path) -> None:
    train = banking77_slice("train", TINY_LABELS, 5)
    train[0]["text"] += f" my card is {VALID_CARDS[0]}"
    write_csv(tmp_path / "train.csv", train)
    write_csv(tmp_path / "test.csv", banking77_slice("test", TINY_LABELS, 2))
    refs = {
        mode: ingest_dataset(
            _slice(mode), "pii", tmp_path / "out", train_path=tmp_path / "train.csv", test_path=tmp_path / "test.csv"
        )
        for mode in ("mask", "off")
    }
    assert refs["mask"].fingerprint != refs["off"].fingerprint
    masked, raw = (read_ingest_report(refs[mode].path) for mode in ("mask", "off"))
    assert masked["pii"] == "mask" and masked["pii_masked"] == {"train": {"CARD_NUMBER": 1}, "test": {}}
    assert raw["pii"] == "off" and raw["pii_masked"] == {}


def test_monitoring_batches_are_masked_or_refused_before_anything_is_stored(tmp_path: Path) -> None:
    batch = tmp_path / "batch.csv"
    batch.write_text(
        "timestamp,text\n"
        "2024-03-04T10:00:00Z,$AAPL falls on China worries\n"
        f"2024-03-04T10:05:00Z,Call {PHONES[2]} to buy $TSLA before it is too late\n"
    )
    items, _ = read_batch(batch, TopicExtractor(), "mask")
    assert [item.text for item in items] == [
        "$AAPL falls on China worries",
        "Call <PHONE_NUMBER> to buy $TSLA before it is too late",
    ]
    assert items[1].topics == ["$TSLA"]
    raw, _ = read_batch(batch, TopicExtractor())  # off: as written, and another content hash
    assert raw[1].text.startswith(f"Call {PHONES[2]}") and raw[1].item_id != items[1].item_id
    with pytest.raises(BatchValidationError, match=r"line 3 \(PHONE_NUMBER\)") as refused:
        read_batch(batch, TopicExtractor(), "reject")
    assert PHONES[2] not in str(refused.value)


# ------------------------------------------------------------------------------------ end to end

PII_DOMAIN = "pii_tiny"
PII_REJECT_DOMAIN = "pii_tiny_reject"
#: Planted into the training file (and one into test): every one must be masked, none may survive anywhere.
PLANTED_TRAIN = {
    "EMAIL": ["jane.doe.4417@example.com", "r.ochoa-9921@mailbox.example.org"],
    "PHONE_NUMBER": ["+44 7911 123456", "(415) 555-2671"],
    "CARD_NUMBER": ["4539 5781 2345 6789", "5105-1051-0510-5100"],
    "IBAN": ["DE89 3704 0044 0532 0130 00", "GB33BUKB20201555555555"],
    "ACCOUNT_NUMBER": ["730192648815"],
}
PLANTED_TEST = {"PHONE_NUMBER": ["+1 202 555 0143"]}
#: Sent to the service only.
PLANTED_REQUESTS = ["mark.twain.8812@example.net", "4929 1234 5678 9015", "FR14 2004 1010 0505 0001 3M02 606"]


def _plant(rows: list[dict], planted: dict[str, list[str]], start: int) -> list[dict]:
    """Append a sentence with each planted value to a different row, from ``start`` on, every third row."""
    sentences = {
        "EMAIL": "you can reach me at {}",
        "PHONE_NUMBER": "call me on {} please",
        "CARD_NUMBER": "my card number is {}",
        "IBAN": "refund it to IBAN {}",
        "ACCOUNT_NUMBER": "my account number is {}",
    }
    position = start
    for kind, values in planted.items():
        for value in values:
            rows[position]["text"] = f"{rows[position]['text']} {sentences[kind].format(value)}"
            position += 3
    return rows


def _variants(value: str) -> set[bytes]:
    """The value as written, and its characters without separators (a step may compact a number)."""
    compact = "".join(character for character in value if character.isalnum())
    return {value.encode(), compact.encode(), value.lower().encode(), compact.lower().encode()}


def _leaks(root: Path, values: list[str]) -> list[str]:
    """``file: value`` for every planted value found in any file under ``root``."""
    needles = {variant: value for value in values for variant in _variants(value)}
    found = []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        found.extend(f"{path}: {value}" for needle, value in needles.items() if needle in data)
    return found


@pytest.fixture(scope="module")
def pii_domains(tiny_domain: str) -> tuple[str, str]:
    """The tiny domain, without compression (this test is about where texts go, not about models), and its twin
    that refuses personal data."""
    spec = get_domain(tiny_domain)
    register(replace(spec, name=PII_DOMAIN, pii="mask", compression=replace(spec.compression, methods=())))
    register(replace(spec, name=PII_REJECT_DOMAIN, pii="reject", compression=replace(spec.compression, methods=())))
    return PII_DOMAIN, PII_REJECT_DOMAIN


def test_planted_values_appear_nowhere_after_a_run_and_requests(
    pii_domains: tuple[str, str],
    tiny_model_dir: Path,
    tmp_path: Path,
    session_home: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from prefect.logging.handlers import APILogWorker

    from flows.pipeline import domain_pipeline

    domain, refusing = pii_domains
    caplog.set_level(logging.DEBUG)
    data_dir = tmp_path / "data"  # outside the home: the only place the raw values may be
    write_csv(data_dir / "train.csv", _plant(banking77_slice("train", TINY_LABELS, 24), PLANTED_TRAIN, 1))
    write_csv(data_dir / "test.csv", _plant(banking77_slice("test", TINY_LABELS, 12), PLANTED_TEST, 4))
    values = [value for planted in (PLANTED_TRAIN, PLANTED_TEST) for group in planted.values() for value in group]
    values += PLANTED_REQUESTS

    # ingest refuses the file for the refusing twin, naming file, line and kind
    with pytest.raises(PiiRejectedError, match=r"train\.csv, column 'text': personal data in 9 text\(s\)"):
        domain_pipeline(domain=refusing, model=str(tiny_model_dir), data_dir=str(data_dir), num_layers=1, seed=5)

    summary = domain_pipeline(
        domain=domain, model=str(tiny_model_dir), data_dir=str(data_dir), epochs=1.0, num_layers=1, seed=5
    )
    assert summary["decision"]["promote"] is True, summary["decision"]["summary"]
    report = read_ingest_report(summary["dataset"]["path"])
    assert report["pii_masked"] == {
        "train": {kind: len(group) for kind, group in PLANTED_TRAIN.items()},
        "test": {"PHONE_NUMBER": 1},
    }
    champion = ModelRegistry(domain).load_champion()
    assert champion is not None
    index = (champion.model_dir / "retrieval.json").read_text()  # the known questions shipped with the champion
    assert "<CARD_NUMBER>" in index and "<IBAN>" in index and "<EMAIL>" in index

    # the same champion serves the refusing twin too
    ModelRegistry(refusing).promote(
        champion.model_dir, metrics={"test": {"accuracy": 0.5}}, lineage={"candidate": "copy"}, decision={}
    )
    server = ThreadedUvicorn(
        create_app(ServingConfig(domains=(domain, refusing), max_wait_ms=5.0), api_keys=ApiKeys([KEY]))
    ).start()
    try:
        headers = {"X-API-Key": KEY}
        texts = [f"my card still has not arrived, mail me at {PLANTED_REQUESTS[0]}", f"card {PLANTED_REQUESTS[1]}"]
        answer = httpx.post(f"{server.url}/v1/{domain}/predict", json={"texts": texts}, headers=headers, timeout=60)
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["predictions"]) == 2
        explained = httpx.post(
            f"{server.url}/v1/{domain}/explain", json={"text": f"refund to {PLANTED_REQUESTS[2]}"}, headers=headers
        )
        assert explained.status_code == 200, explained.text
        assert [word["word"] for word in explained.json()["words"]] == ["refund", "to", "IBAN"]  # of "<IBAN>"
        refused = httpx.post(f"{server.url}/v1/{refusing}/predict", json={"texts": texts}, headers=headers)
        assert refused.status_code == 422
        detail = refused.json()["detail"]
        assert "texts[0] (EMAIL)" in detail and "texts[1] (CARD_NUMBER)" in detail
        for response in (answer, explained, refused):
            assert not [value for value in values if value in response.text]
    finally:
        server.stop()

    APILogWorker.drain_all(timeout=10)  # run logs reach Prefect's database before it is searched
    assert _leaks(session_home, values) == []  # runs, datasets, registry, Prefect's database and results
    logged = caplog.text + "".join(capfd.readouterr())
    assert [value for value in values if any(variant.decode() in logged for variant in _variants(value))] == []
