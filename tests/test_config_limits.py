"""Config files a loader must survive: alias bombs, deep nesting, repeated keys, huge files.

Each used to cost minutes, gigabytes or a traceback (an internal error, exit 1). Now each is one
short ``error:`` line and exit 2, and thousands of sources still load.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from streamdet import config
from streamdet.cli import main
from streamdet.config import MAX_YAML_DEPTH, MAX_YAML_VALUES, load_config, read_yaml
from streamdet.errors import ConfigError

MAX_ERROR_CHARS = 2000  # an error line repeats at most ten problems, each cut short


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def alias_bomb(levels: int, leaf: str = '"lol"', fan_out: int = 10) -> str:
    """'Billion laughs': each anchor is a list of ``fan_out`` aliases of the one before."""
    lines = [f"a0: &a0 [{leaf}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fan_out)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def nested_flow(depth: int, inner: str = "") -> str:
    return "[" * depth + inner + "]" * depth


def nested_blocks(depth: int) -> str:
    return "".join(f"{' ' * level}k{level}:\n" for level in range(depth))


LOADERS = ["libyaml", "python"]


@pytest.fixture(params=LOADERS)
def loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The test on libyaml's parser, then on PyYAML's pure-Python one (PyYAML without libyaml)."""
    if request.param == "python":
        monkeypatch.setattr(config, "_LOADER", config._PyLoader)
    elif not yaml.__with_libyaml__:
        pytest.skip("PyYAML is built without libyaml")
    yield request.param


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message and len(message) < MAX_ERROR_CHARS
    return message


# --- one short error line from the command line ---------------------------------------------

# id -> (YAML text, a fragment the error must contain)
HOSTILE: dict[str, tuple[str, str]] = {
    "alias-bomb": (alias_bomb(10) + "sources: *a9\n", "(an alias bomb?)"),
    "alias-bomb-of-unset-env": (alias_bomb(10, '"${SD_TEST_NOPE}"'), "(an alias bomb?)"),
    "alias-bomb-of-mappings": (
        alias_bomb(10, "{name: a, url: b}") + "sources: *a9\n",
        "(an alias bomb?)",
    ),
    "many-unset-env": (alias_bomb(5, '"${SD_TEST_NOPE}"'), "and 11,101 more"),  # 11,111 strings
    "many-invalid-sources": ("sources:\n" + "  - {name: a}\n" * 1000, "and 990 more"),
    "deep-flow": ("model: " + nested_flow(5000) + "\n", f"nested more than {MAX_YAML_DEPTH} deep"),
    "deep-blocks": (nested_blocks(2000), f"nested more than {MAX_YAML_DEPTH} deep at line 101"),
    "recursive-alias": ("sources: &s [*s]\n", "inside its own anchor"),
    "duplicate-key": (
        "model:\n  width: 0.5\nmodel:\n  device: cpu\n",
        "duplicate key 'model' at lines 1 and 3",
    ),
    "long-undefined-alias": ("sources: *" + "x" * 100_000 + "\n", "found undefined alias 'xxx"),
    "long-unknown-key": ("? " + "x" * 100_000 + "\n: 1\n", "xxx...: unknown key"),
    "long-unset-env-name": ("truth: ${" + "X" * 100_000 + "}\n", "environment variable XXX"),
}


@pytest.mark.parametrize(("text", "fragment"), HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_config_is_one_short_error_line_and_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    text: str,
    fragment: str,
) -> None:
    """These printed a traceback (RecursionError), hundreds of MB, or ran for minutes."""
    monkeypatch.delenv("SD_TEST_NOPE", raising=False)
    path = write(tmp_path, text)
    code = main(["validate", str(path)])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err.startswith(f"error: {path}: ") and err.count("\n") == 1
    assert "Traceback" not in err and len(err) < MAX_ERROR_CHARS
    assert fragment in err


# --- alias bombs -------------------------------------------------------------------------------


def test_alias_bomb_stops_at_the_value_limit(tmp_path: Path, loader: str) -> None:
    """10**9 strings once expanded: safe_load shared them, then env substitution copied them all."""
    message = error_of(write(tmp_path, alias_bomb(10) + "sources: *a9\n"))
    assert f"more than {MAX_YAML_VALUES:,} values by line 7" in message  # a6 is 10**6, a7 10**7


def test_an_alias_counts_as_every_value_it_repeats(
    tmp_path: Path, loader: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the root, key a, the anchored list of 4 values, key b, b's list, and 3 aliases of 4 values
    path = write(tmp_path, "a: &a [1, 2, 3]\nb: [*a, *a, *a]\n")
    monkeypatch.setattr(config, "MAX_YAML_VALUES", 19)
    with pytest.raises(ConfigError, match=r"more than 19 values by line 2"):
        read_yaml(path)
    monkeypatch.setattr(config, "MAX_YAML_VALUES", 20)
    assert read_yaml(path) == {"a": [1, 2, 3], "b": [[1, 2, 3]] * 3}


@pytest.mark.parametrize(
    ("items", "loads"), [(97, True), (98, False)], ids=["at-limit", "over-limit"]
)
def test_a_plain_file_may_hold_at_most_max_yaml_values(
    tmp_path: Path, loader: str, monkeypatch: pytest.MonkeyPatch, items: int, loads: bool
) -> None:
    monkeypatch.setattr(config, "MAX_YAML_VALUES", 100)
    path = write(tmp_path, f"a: [{', '.join(['1'] * items)}]\n")  # root, key and list: 3 more
    if loads:
        assert read_yaml(path) == {"a": [1] * items}
    else:
        with pytest.raises(ConfigError, match="more than 100 values"):
            read_yaml(path)


def test_recursive_alias_is_an_error(tmp_path: Path, loader: str) -> None:
    """safe_load built a list inside itself, and env substitution recursed until RecursionError."""
    message = error_of(write(tmp_path, "sources:\n  - &s {name: a, url: [*s]}\n"))
    assert "malformed YAML at line 2" in message and "alias 's' is inside its own anchor" in message


# --- nesting depth -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [nested_flow(5000), nested_blocks(5000), nested_flow(1_000_000)],
    ids=["flow", "blocks", "flow-million"],
)
def test_deep_nesting_is_an_error_not_a_crash(tmp_path: Path, loader: str, text: str) -> None:
    """RecursionError (exit 1) in PyYAML's composer; libyaml's crashed at ~100,000 levels."""
    assert f"nested more than {MAX_YAML_DEPTH} deep" in error_of(write(tmp_path, text))


@pytest.mark.parametrize(
    ("depth", "loads"),
    [(MAX_YAML_DEPTH, True), (MAX_YAML_DEPTH + 1, False)],
    ids=["at-limit", "over-limit"],
)
def test_nesting_limit_is_exact(tmp_path: Path, loader: str, depth: int, loads: bool) -> None:
    path = write(tmp_path, "a: " + nested_flow(depth - 1) + "\n")  # the root mapping is level 1
    if loads:
        assert read_yaml(path) == {"a": yaml.safe_load(nested_flow(depth - 1))}
    else:
        with pytest.raises(ConfigError, match=f"nested more than {MAX_YAML_DEPTH} deep at line 1"):
            read_yaml(path)


@pytest.mark.parametrize(
    ("outer", "loads"), [(49, True), (50, False)], ids=["at-limit", "over-limit"]
)
def test_nesting_counts_through_aliases(
    tmp_path: Path, loader: str, outer: int, loads: bool
) -> None:
    """50 lists under an anchor, used 49 (50) lists deep below the root: 100 (101) levels."""
    path = write(tmp_path, f"a: &a {nested_flow(50)}\nb: {nested_flow(outer, '*a')}\n")
    if loads:
        assert read_yaml(path)["b"] == yaml.safe_load(nested_flow(outer + 50))
    else:
        with pytest.raises(ConfigError, match=r"nested more than 100 deep at line 2"):
            read_yaml(path)


# --- duplicate keys ----------------------------------------------------------------------------

# id -> (YAML text, the error's fragment)
DUPLICATES: dict[str, tuple[str, str]] = {
    "top-level": (
        "model:\n  width: 0.5\nwindow:\n  stride: 4\nmodel:\n  device: cpu\n",
        "duplicate key 'model' at lines 1 and 5",
    ),
    "nested": (
        "model:\n  width: 0.5\n  device: cpu\n  width: 2\n",
        "duplicate key 'width' at lines 2 and 4",
    ),
    "in-a-source": (
        "sources:\n  - name: a\n    url: '0'\n    name: b\n",
        "duplicate key 'name' at lines 2 and 4",
    ),
    "flow": ("model: {width: 1, width: 2}\n", "duplicate key 'width' at line 1, columns 9 and 19"),
    "quoted-and-plain": ("'model': {}\nmodel: {}\n", "duplicate key 'model' at lines 1 and 2"),
    "two-merge-keys": (
        "a: &a {x: 1}\nb: &b {y: 1}\nc:\n  <<: *a\n  <<: *b\n",
        "duplicate key '<<' at lines 4 and 5",
    ),
    "in-an-anchor": ("a: &a {x: 1, x: 2}\n", "duplicate key 'x' at line 1, columns 8 and 14"),
}


@pytest.mark.parametrize(("text", "fragment"), DUPLICATES.values(), ids=DUPLICATES.keys())
def test_duplicate_key_is_an_error_naming_the_key_and_both_lines(
    tmp_path: Path, loader: str, text: str, fragment: str
) -> None:
    """The first block was silently dropped: `model:` twice kept only the second."""
    assert fragment in error_of(write(tmp_path, text))


def test_merge_key_overrides_are_not_duplicates(tmp_path: Path, loader: str) -> None:
    path = write(
        tmp_path,
        (
            "sources:\n"
            "  - &cam {name: a, url: '0', options: {fps: 5, reconnect: false}}\n"
            "  - <<: *cam\n"
            "    name: b\n"
            "    url: '1'\n"
        ),
    )
    cfg = load_config(path)
    assert [(s.name, s.url, s.options.fps, s.options.reconnect) for s in cfg.sources] == [
        ("a", "0", 5.0, False),
        ("b", "1", 5.0, False),
    ]


# --- the same objects as yaml.safe_load --------------------------------------------------------

SAFE_LOAD_CASES: dict[str, str] = {
    "scalars": "a: 1\nb: 1.5\nc: true\nd: null\ne: ~\nf: '1'\ng: 0x1f\nh: .inf\ni: 2001-12-14\n"
    "j: yes\nk: -0.5e3\n",
    "strings": "a: |\n  line 1\n  line 2\nb: >\n  folded\n  text\n"
    "c: \"tab\\there\"\nd: 'it''s'\ne: caf\u00e9\n",
    "collections": "a: []\nb: {}\nc:\nd: [1, [2, {x: y}]]\ne:\n  - f: 1\n    g: [h]\n",
    "non-string-keys": "1: one\n2.5: two\ntrue: three\nnull: four\n2001-12-14: five\n",
    "aliases": "o: &o {fps: 5}\ns:\n  - {name: a, options: *o}\n  - {name: b, options: *o}\n"
    "n: &n 7\nm: *n\n",
    "merge": "base: &b {x: 1, y: 2}\nchild:\n  <<: *b\n  y: 3\n",
    "merge-list": "a: &a {x: 1}\nb: &b {x: 2, y: 2}\nc: {<<: [*a, *b], z: 3}\n",
    "tags": "a: !!str 1\nb: !!float 2\nc: !!binary aGVsbG8=\nd: !!set {x, y}\n"
    "e: !!omap [{k: v}]\nf: ! 12\n",
    "document-markers": "%YAML 1.1\n---\na: 1\n...\n",
    "bom-and-crlf": "\ufeffa: 1\r\nb: [2, 3]\r\n",
}


@pytest.mark.parametrize("text", SAFE_LOAD_CASES.values(), ids=SAFE_LOAD_CASES.keys())
def test_loader_makes_what_safe_load_makes(loader: str, text: str) -> None:
    assert config._parse_yaml(text) == yaml.safe_load(text)


@pytest.mark.parametrize(
    "text",
    [
        "a: [1\n",
        "? [1, 2]\n: x\n",
        "a: !!python/object:os.system x\n",
        "--- 1\n--- 2\n",
        "a: *nope\n",
        "a: &x 1\nb: &x 2\n",
    ],
    ids=[
        "unclosed",
        "unhashable-key",
        "python-tag",
        "two-documents",
        "undefined-alias",
        "anchor-twice",
    ],
)
def test_loader_rejects_what_safe_load_rejects(tmp_path: Path, loader: str, text: str) -> None:
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load(text)
    assert "malformed YAML at line" in error_of(write(tmp_path, text))


def test_libyaml_parser_is_used_where_pyyaml_has_it() -> None:
    """The pure-Python parser takes several times as long on a large config."""
    assert config._LOADER is (config._CLoader if yaml.__with_libyaml__ else config._PyLoader)


# --- large configs -----------------------------------------------------------------------------


def test_file_over_max_config_bytes_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config, "MAX_CONFIG_BYTES", 2**20)
    text = "truth: " + "x" * (2**20 - 8) + "\n"
    assert read_yaml(write(tmp_path, text)) == {"truth": "x" * (2**20 - 8)}
    assert "config file too large: over 1 MiB" in error_of(write(tmp_path, text + "\n"))


def test_thousands_of_sources_with_aliases_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SD_TEST_PASSWORD", "pa55word")
    sources = "".join(
        f"  - {{name: cam{i}, url: 'rtsp://u:${{SD_TEST_PASSWORD}}@10.0.{i // 256}.{i % 256}/s', "
        "options: *opts}\n"
        for i in range(5000)
    )
    path = write(
        tmp_path,
        "sources:\n  - &first {name: first, url: '0', options: &opts {fps: 5}}\n" + sources,
    )
    cfg = load_config(path)
    assert len(cfg.sources) == 5001 and cfg.sources[-1].url == "rtsp://u:pa55word@10.0.19.135/s"
    assert all(s.options.fps == 5 for s in cfg.sources)


def test_duplicate_source_names_are_found_among_200k() -> None:
    """It counted each name through the whole list: 5 s at 20,000 names, 100x that at 200,000."""
    sources = [{"name": f"cam{i}", "url": str(i % 10)} for i in range(200_000)]
    sources[150_000]["name"] = "cam7"
    sources[199_999]["name"] = "cam123"
    with pytest.raises(
        ConfigError, match=r"source names must be unique, but \['cam123', 'cam7'\] repeat$"
    ):
        load_config(None, {"sources": sources})


def test_many_duplicate_source_names_are_counted_not_listed() -> None:
    sources = [{"name": f"cam{i % 1000}", "url": "0"} for i in range(3000)]
    with pytest.raises(ConfigError) as raised:
        load_config(None, {"sources": sources})
    assert str(raised.value) == (
        "sources: source names must be unique, but ['cam0', 'cam1', 'cam10', "
        "'cam100', 'cam101'] and 995 more repeat"
    )
