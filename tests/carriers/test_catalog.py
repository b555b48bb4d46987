"""Tests for carriers/catalog.py: the example catalog, prices, permissions and load errors."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from carriers.catalog import (
    EXAMPLE_CATALOG,
    Catalog,
    CatalogError,
    load_catalog,
    parse_catalog,
)
from features import DestinationParser


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    """The shipped example catalog."""
    return load_catalog()


# ---- the example catalog ------------------------------------------------------------------


def test_example_catalog_loads(catalog: Catalog) -> None:
    assert catalog.source == str(EXAMPLE_CATALOG)
    assert catalog.version == "2026-11-01" and catalog.currency == "USD"
    assert len(catalog.carriers) >= 6
    assert list(catalog.carriers)[:2] == ["globalprime", "eurodirect"]  # file order kept
    countries = catalog.countries()
    assert len(countries) >= 8
    assert countries == sorted(countries)
    per_country: dict[str, int] = {}
    for op in catalog.directory.operators:
        per_country[op.country] = per_country.get(op.country, 0) + 1
    assert sum(1 for n in per_country.values() if n >= 2) >= 8
    assert per_country["RU"] == 4 and per_country["NG"] == 4 and per_country["KE"] == 2
    # Every covered country resolves to a directory with operators.
    assert set(countries) <= set(per_country)


def test_carrier_fields(catalog: Catalog) -> None:
    prime = catalog.carriers["globalprime"]
    assert prime.billing == "submit" and prime.priority == 1
    assert prime.throughput_mps == 400
    assert prime.sender_types == frozenset({"alphanumeric", "numeric", "shortcode"})
    assert prime.connection["port"] == 2775
    assert catalog.carriers["eurodirect"].billing == "delivery"
    assert catalog.carriers["eurodirect"].bills_on_delivery
    assert not catalog.carriers["globalprime"].bills_on_delivery
    assert catalog.carriers["latamobile"].sender_types == frozenset({"numeric", "shortcode"})


def test_price_for_operator_override(catalog: Catalog) -> None:
    ru = catalog.carriers["rulocal"].coverage["RU"]
    assert ru.price_for("mts") == 0.044
    assert ru.price_for("megafon") == 0.046
    assert ru.price_for("beeline") == 0.047
    assert ru.price_for("unknown") == 0.047
    de = catalog.carriers["eurodirect"].coverage["DE"]
    assert (de.price_for("o2"), de.price_for("telekom")) == (0.068, 0.072)
    assert catalog.carriers["asiahub"].coverage["IN"].price_for("jio") == 0.0038


def test_excluded_operators(catalog: Catalog) -> None:
    ru = catalog.carriers["eurodirect"].coverage["RU"]
    assert ru.excluded_operators == frozenset({"t2"})
    assert not ru.covers("t2")
    assert ru.covers("mts") and ru.covers("unknown")
    assert catalog.carriers["globalprime"].coverage["RU"].covers("t2")


def test_tenant_permissions(catalog: Catalog) -> None:
    assert set(catalog.tenants) == {"default", "acme", "globex", "initech"}
    assert catalog.tenant(None) is catalog.tenants["default"]
    assert catalog.tenant("nobody") is None
    globex = catalog.tenants["globex"]
    assert globex.may_send_to("DE") and globex.may_send_to("RU")
    assert not globex.may_send_to("NG")
    assert globex.may_use("budgetroute")
    initech = catalog.tenants["initech"]
    assert initech.may_use("globalprime") and not initech.may_use("budgetroute")
    assert initech.may_send_to("NG")
    assert catalog.conversion_tenants() == frozenset({"acme", "initech"})


def test_catalog_without_tenants_grants_everything() -> None:
    cat = parse_catalog(
        {"version": "1", "carriers": [{"id": "a", "coverage": {"RU": {"price": 1}}}]}
    )
    tenant = cat.tenant("anyone")
    assert tenant is not None and tenant.id == "anyone"
    assert tenant.may_send_to("ZW") and tenant.may_use("zzz") and not tenant.reports_conversions


def test_directory_aliases_map_phonenumbers_names(catalog: Catalog) -> None:
    assert catalog.directory.by_carrier_name("RU", "Tele2") == "t2"
    assert catalog.directory.by_carrier_name("RU", "tele2") == "t2"
    assert catalog.directory.by_carrier_name("DE", "T-Mobile") == "telekom"
    assert catalog.directory.by_carrier_name("DE", "Tele2") == "unknown"
    entry = catalog.directory.by_mccmnc("26207")
    assert entry is not None and (entry.country, entry.id) == ("DE", "o2")
    parser = DestinationParser(catalog.directory)
    assert parser.parse("+447400123456", "23410").operator == "o2"  # GB's o2, not DE's


# ---- validation errors name the file, the entry and the field -----------------------------

BASE: dict[str, Any] = {
    "version": "t1",
    "countries": {
        "RU": {"operators": [{"id": "mts", "name": "MTS", "mccmnc": ["25001"]}]},
        "DE": {"operators": [{"id": "o2", "name": "O2"}]},
    },
    "carriers": [
        {"id": "alpha", "coverage": {"RU": {"price": 0.05}}},
        {
            "id": "bravo",
            "billing": "delivery",
            "coverage": {
                "RU": {"price": 0.04, "operators": {"mts": 0.03}},
                "DE": {"price": 0.07},
            },
        },
    ],
    "tenants": [{"id": "default"}, {"id": "t1", "carriers": ["alpha"]}],
}


def _write(tmp_path: Path, mutate: Callable[[dict[str, Any]], None]) -> Path:
    """BASE with `mutate` applied, written as YAML under tmp_path."""
    doc = copy.deepcopy(BASE)
    mutate(doc)
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def _error(path: Path) -> str:
    """The CatalogError message of loading `path`; the file must be named in it."""
    with pytest.raises(CatalogError) as err:
        load_catalog(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: "), msg
    return msg


# Entries are named either "carriers[1] (id=...)" or by pydantic's "carriers.1" location.
CARRIER_1 = r"carriers(\[1\]|\.1\b)"


def test_base_document_is_valid(tmp_path: Path) -> None:
    cat = load_catalog(_write(tmp_path, lambda d: None))
    assert list(cat.carriers) == ["alpha", "bravo"]
    assert cat.carriers["bravo"].coverage["RU"].price_for("mts") == 0.03


@pytest.mark.parametrize(
    ("name", "mutate", "patterns"),
    [
        (
            "negative price",
            lambda d: d["carriers"][1]["coverage"]["RU"].update(price=-0.01),
            [CARRIER_1, r"coverage\.RU\.price", r">= 0|greater than or equal to 0"],
        ),
        (
            "negative operator price",
            lambda d: d["carriers"][1]["coverage"]["RU"]["operators"].update(mts=-1),
            [CARRIER_1, r"coverage\.RU\.operators", r"'mts'", r">= 0"],
        ),
        (
            "unknown country in coverage",
            lambda d: d["carriers"][1]["coverage"].update(ZZ={"price": 0.1}),
            [r"carriers\[1\] \(id=bravo\)", r"coverage\.ZZ", r"unknown country code"],
        ),
        (
            "operator price for an unlisted operator",
            lambda d: d["carriers"][1]["coverage"]["DE"].update(operators={"vodafone": 0.1}),
            [r"carriers\[1\] \(id=bravo\)", r"coverage\.DE", r"'vodafone'", r"countries\.DE"],
        ),
        (
            "excluding an unlisted operator",
            lambda d: d["carriers"][0]["coverage"]["RU"].update(exclude_operators=["beeline"]),
            [r"carriers\[0\] \(id=alpha\)", r"coverage\.RU", r"'beeline'"],
        ),
        (
            "duplicate carrier id",
            lambda d: d["carriers"][1].update(id="alpha"),
            [r"carriers\[1\] \(id=alpha\)\.id", r"duplicate carrier id"],
        ),
        (
            "unknown billing",
            lambda d: d["carriers"][1].update(billing="monthly"),
            [CARRIER_1, r"billing", r"'submit' or 'delivery'"],
        ),
        (
            "non-positive throughput",
            lambda d: d["carriers"][0].update(throughput_mps=0),
            [r"carriers(\[0\]|\.0\b)", r"throughput_mps", r"greater than 0"],
        ),
        (
            "tenant naming an unknown carrier",
            lambda d: d["tenants"][1].update(carriers=["zulu"]),
            [r"tenants\[1\] \(id=t1\)\.carriers", r"unknown carrier 'zulu'"],
        ),
        (
            "tenant naming an unknown country",
            lambda d: d["tenants"][1].update(countries=["XX"]),
            [r"tenants\[1\] \(id=t1\)\.countries", r"'XX'"],
        ),
        (
            "duplicate tenant",
            lambda d: d["tenants"][1].update(id="default"),
            [r"tenants\[1\] \(id=default\)\.id", r"duplicate tenant id"],
        ),
        (
            "unknown country section",
            lambda d: d["countries"].update(XX={}),
            [r"countries\.XX", r"ISO 3166"],
        ),
        (
            "unknown top-level key",
            lambda d: d.update(carrierz=[]),
            [r"carrierz", r"[Ee]xtra inputs are not permitted"],
        ),
        (
            "unknown carrier field",
            lambda d: d["carriers"][1].update(pricee=1),
            [CARRIER_1, r"pricee", r"not permitted"],
        ),
        (
            "malformed mccmnc",
            lambda d: d["countries"]["RU"]["operators"][0].update(mccmnc=["2500"]),
            [r"countries\.RU\.operators\.0\.mccmnc", r"'2500'", r"5 or 6 digits"],
        ),
        (
            "empty carriers list",
            lambda d: d.update(carriers=[]),
            [r"carriers", r"at least 1 item"],
        ),
        (
            "carrier without coverage",
            lambda d: d["carriers"][0].update(coverage={}),
            [r"carriers(\[0\]|\.0\b)", r"coverage", r"at least 1 item"],
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_validation_errors_name_entry_and_field(
    tmp_path: Path,
    name: str,
    mutate: Callable[[dict[str, Any]], None],
    patterns: list[str],
) -> None:
    msg = _error(_write(tmp_path, mutate))
    for pattern in patterns:
        assert re.search(pattern, msg), f"{name}: {pattern!r} not in {msg!r}"


def test_malformed_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("version: [1\ncarriers: {\n", encoding="utf-8")
    msg = _error(path)
    assert "not valid YAML" in msg and "line 1" in msg


def test_missing_file(tmp_path: Path) -> None:
    msg = _error(tmp_path / "nowhere.yaml")
    assert "cannot read the catalog" in msg and "No such file" in msg


@pytest.mark.parametrize("text", ["", "- 1\n- 2\n", "just a string\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = tmp_path / "odd.yaml"
    path.write_text(text, encoding="utf-8")
    assert "must be a mapping at the top level" in _error(path)


def test_parse_catalog_names_its_source() -> None:
    with pytest.raises(CatalogError, match=r"^inline: carriers: List should have at least 1"):
        parse_catalog({"version": "1", "carriers": []}, source="inline")
