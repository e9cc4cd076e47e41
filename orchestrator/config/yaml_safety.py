"""Parsing a config's YAML (or JSON) text with limits, so that hostile or mistaken input ends in a short
error instead of a silent surprise, a hang or a crash.

`parse_yaml(text, source)` is yaml.safe_load with these rules (each broken one raises YamlProblem with
the line, which orchestrator/config/loading.py turns into a ConfigError naming the file or `--set`):
- a key given twice in one mapping (at any level) is an error naming the key and both lines (YAML would
  silently keep the last one); `<<` merge keys may still be overridden, as YAML intends;
- nesting deeper than MAX_DEPTH levels is refused while parsing (before Python's recursion limit);
- aliases are bounded by what they expand to: a document whose tree, with every alias use counted in
  full, holds more than MAX_NODES values (a "billion laughs" alias bomb) or refers to itself is refused,
  in time proportional to the file, not to the expansion;
- texts over MAX_CONFIG_CHARS characters (a `--set` value: MAX_SET_VALUE_CHARS) are refused unread (no
  config needs them; PyYAML reads about 100 KB a second);
- a number too long to convert, or any other construction failure, is a YamlProblem, not a traceback.
Pure Python on PyYAML's SafeLoader (no arbitrary object construction).
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_CONFIG_CHARS = 256_000  # a config of a few hundred lines is ~10 KB
MAX_SET_VALUE_CHARS = 16_000  # one `--set` value
MAX_DEPTH = 50  # a config is 3-4 levels deep
MAX_NODES = 100_000  # values after alias expansion
MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlProblem(ValueError):
    """Text that is not a usable config document; `line` is 1-based (None when unknown)."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line

    def where(self) -> str:
        return f"line {self.line}: " if self.line else ""


class _LimitedLoader(yaml.SafeLoader):
    """SafeLoader that bounds nesting while composing and refuses duplicate keys while constructing."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise YamlProblem(f"nested more than {MAX_DEPTH} levels deep; a config needs a few", mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        if isinstance(node, MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == MERGE_TAG or not isinstance(key_node, ScalarNode):
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                    if first is None:
                        seen[key] = line
                        continue
                except TypeError:  # an unhashable key: PyYAML's own construction refuses it
                    continue
                from orchestrator.redaction import excerpt

                lines = f"line {line}" if first == line else f"lines {first} and {line}"
                raise YamlProblem(f"key {excerpt(key, 60)} appears twice in one section ({lines}); "
                                  "YAML would silently keep the last one: keep one of them", line)
        return super().construct_mapping(node, deep)


def _check_expansion(root: Node) -> None:
    """Refuse a node graph whose expanded tree exceeds MAX_NODES values or MAX_DEPTH levels, or that is cyclic.

    Sizes are memoised per node, so an alias bomb costs the size of its text, not of its expansion."""
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values in its expanded tree, its height)
    open_nodes: set[int] = set()

    def visit(node: Node, level: int) -> tuple[int, int]:
        known = sizes.get(id(node))
        if known is None:
            if id(node) in open_nodes:
                raise YamlProblem("an alias refers to the value that contains it (a recursive structure)",
                                  node.start_mark.line + 1)
            if level > MAX_DEPTH:
                raise YamlProblem(f"nested more than {MAX_DEPTH} levels deep (counting aliases)", node.start_mark.line + 1)
            open_nodes.add(id(node))
            if isinstance(node, SequenceNode):
                children = list(node.value)
            elif isinstance(node, MappingNode):
                children = [part for pair in node.value for part in pair]
            else:
                children = []
            size, height = 1, 0
            for child in children:
                child_size, child_height = visit(child, level + 1)
                size, height = size + child_size, max(height, child_height + 1)
                if size > MAX_NODES:
                    raise YamlProblem(f"expands to more than {MAX_NODES:,} values (YAML aliases repeated inside each "
                                      "other, an 'alias bomb'?); a config needs a few hundred", node.start_mark.line + 1)
            open_nodes.discard(id(node))
            known = sizes[id(node)] = (size, height)
        if level + known[1] > MAX_DEPTH:
            raise YamlProblem(f"nested more than {MAX_DEPTH} levels deep (counting aliases)", node.start_mark.line + 1)
        return known

    visit(root, 0)


def parse_yaml(text: str, what: str = "config", max_chars: int = MAX_CONFIG_CHARS) -> Any:
    """The document in `text` (None when empty), within the limits of this module; raises YamlProblem."""
    if len(text) > max_chars:
        raise YamlProblem(f"is {len(text):,} characters long; a {what} is at most {max_chars:,}")
    loader = _LimitedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    except YamlProblem:
        raise
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        detail = " ".join(part for part in (error.context, error.problem) if part)
        raise YamlProblem(f"not valid YAML: {detail}", mark.line + 1 if mark else None) from None
    except yaml.YAMLError as error:
        raise YamlProblem(f"not valid YAML: {str(error).splitlines()[0][:200]}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as error:  # e.g. an integer of 5000 digits
        detail = "a number of thousands of digits" if "digits" in str(error) else str(error).splitlines()[0][:120]
        raise YamlProblem(f"a value cannot be read ({detail})") from None
    finally:
        loader.dispose()
