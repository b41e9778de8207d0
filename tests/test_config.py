import pytest

import multiretrieval as mr
from multiretrieval.config import RetrieverConfig


def test_default_yaml_matches_the_defaults():
    assert RetrieverConfig.from_yaml("configs/default.yaml") == RetrieverConfig()


def test_jewelry_config_embeds_the_attributes_customers_describe():
    cfg = RetrieverConfig.from_yaml("configs/jewelry.yaml")
    assert cfg.catalog.text_columns == ("title", "description", "material", "gemstone", "metal_colour")


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("fusion:\n  knd: late\n")
    with pytest.raises(mr.ConfigError, match=r"fusion: unknown key\(s\) \['knd'\]"):
        RetrieverConfig.from_yaml(path)


def test_a_misspelt_key_or_section_is_answered_with_the_nearest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("catalog:\n  image_colum: image_url\n")
    with pytest.raises(mr.ConfigError, match=r"catalog: unknown key\(s\) \['image_colum'\]; did you mean 'image_column'\?"):
        RetrieverConfig.from_yaml(path)
    with pytest.raises(mr.ConfigError, match=r"override: unknown section 'catalogue'; did you mean 'catalog'\?"):
        RetrieverConfig().with_overrides({"catalogue": {"image_column": "x"}})


def test_the_image_column_is_a_catalog_setting(tmp_path):
    assert RetrieverConfig().catalog.image_column is None  # found by name or values
    path = tmp_path / "c.yaml"
    path.write_text("catalog:\n  image_column: Image URL\n")
    assert RetrieverConfig.from_yaml(path).catalog.image_column == "Image URL"


def test_wrong_type_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("encoders:\n  batch_size: many\n")
    with pytest.raises(mr.ConfigError, match="encoders.batch_size: expected int"):
        RetrieverConfig.from_yaml(path)


def test_the_currency_is_a_display_setting_checked_as_a_code(tmp_path):
    assert RetrieverConfig().display.currency is None  # plain numbers
    assert RetrieverConfig.from_yaml("configs/demo.yaml").display.currency == "EUR"
    assert RetrieverConfig().with_overrides({"display": {"currency": "jpy"}}).display.currency == "JPY"
    path = tmp_path / "c.yaml"
    path.write_text("display:\n  currency: euro\n")
    with pytest.raises(mr.ConfigError, match=r"c.yaml.display.currency: expected an ISO 4217 code .* got 'euro'"):
        RetrieverConfig.from_yaml(path)


def test_overrides_replace_single_values():
    cfg = RetrieverConfig().with_overrides({"index": {"factory": "HNSW32"}})
    assert cfg.index.factory == "HNSW32" and cfg.fusion == RetrieverConfig().fusion


def test_missing_file():
    with pytest.raises(mr.ConfigError, match="config file not found"):
        RetrieverConfig.from_yaml("configs/nope.yaml")
