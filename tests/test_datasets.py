from multiretrieval.datasets import parse_java_properties


def test_parse_java_properties():
    text = "# comment\nname#1=Bill 10\\u20ac\nkey : value with \\\n    continuation\n! other comment\nempty=\n"
    props = parse_java_properties(text)
    assert props == {"name#1": "Bill 10€", "key": "value with continuation", "empty": ""}
