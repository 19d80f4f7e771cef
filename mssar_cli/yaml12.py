"""YAML as recipes need it: YAML 1.2 numbers and duplicate keys refused (PyYAML's SafeLoader
reads ``1e-4`` as a string and silently keeps the last of two equal keys)."""

from __future__ import annotations

import re

import yaml


class DuplicateKeyError(yaml.constructor.ConstructorError):
    def __init__(self, key, first_line: int, mark) -> None:
        super().__init__(None, None, f"duplicate key {key!r} (first at line {first_line})", mark)
        self.key = key
        self.first_line = first_line


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads ``1e-4`` as a number (YAML 1.2; PyYAML's 1.1 rules make it a
    string, which a float key would then reject)."""


def _check_duplicates(node, prefix: str = "", seen_nodes: set | None = None) -> None:
    """PyYAML silently keeps the last of two equal keys (a second ``optim:`` section would replace
    the first without a word); a recipe rejects them, naming the dotted key."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias of a node already walked
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                name = (key_node.tag, key_node.value)
                if name in first:
                    raise DuplicateKeyError(
                        prefix + key_node.value, first[name], key_node.start_mark
                    )
                first[name] = key_node.start_mark.line + 1
                _check_duplicates(value_node, f"{prefix}{key_node.value}.", seen_nodes)
            else:
                _check_duplicates(value_node, prefix, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicates(item, prefix, seen_nodes)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse(text: str):
    """The document in ``text`` (YAML 1.2 numbers); raises :class:`DuplicateKeyError` for a key
    given twice in one mapping, and ``yaml.YAMLError`` for any other problem."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicates(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()
