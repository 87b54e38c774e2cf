"""Credentials are masked in every URL and text streamdet shows, wherever the URL carries them.

The table tests pin exact output (credentials masked, host, port, path and channel numbers kept);
the property tests put generated passwords in each place a camera URL carries one and check that
no form of them (typed, percent-encoded, percent-decoded) survives. The origin tests check where
the messages are made, :class:`OpenCVSource` and the capture thread, not the CLI.
"""

from __future__ import annotations

import doctest
import logging
import subprocess
import sys
import threading
import time
import urllib.parse

import cv2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streamdet.redaction
import streamdet.sources
from streamdet.buffer import RingBuffer
from streamdet.errors import SourceError
from streamdet.preprocess import PreprocessContract
from streamdet.redaction import (
    classify_name,
    redact_text,
    redact_url,
    register_secrets,
    url_secrets,
)
from streamdet.sources import (
    CaptureThread,
    OpenCVSource,
    Pacing,
    SourceKind,
    Status,
    StatusChange,
    make_opener,
    source_name,
)

RAW = "Zq7/s@n:t?1"  # a password with every character that ends a part of a URL
ENC = urllib.parse.quote(RAW, safe="")  # Zq7%2Fs%40n%3At%3F1


def forms(secret: str) -> set[str]:
    """The secret as typed, percent-decoded and percent-encoded."""
    decoded = urllib.parse.unquote(secret)
    return {secret, decoded, urllib.parse.quote(decoded, safe="")}


def assert_no_secret(text: str, *secrets: str) -> None:
    for secret in secrets:
        for form in forms(secret):
            assert form not in text, f"{form!r} appears in {text!r}"


H = "10.0.0.5"  # the camera's host in the tables


def case(url: str, expected: str, secrets: list[str], name: str):
    return pytest.param(url, expected, secrets, id=name)


MASKED = [
    case(
        f"rtsp://admin:{ENC}@{H}:554/Streaming/Channels/101",
        f"rtsp://admin:***@{H}:554/Streaming/Channels/101",
        [RAW],
        "userinfo-encoded",
    ),
    case(
        f"rtsp://admin:{RAW}@{H}:554/live?channel=1",
        f"rtsp://admin:***@{H}:554/live?channel=1",
        [RAW],
        "userinfo-raw-/@:?",
    ),
    case(
        f"rtsp://admin:pa/ss@{H}/live",
        f"rtsp://admin:***@{H}/live",
        ["pa/ss"],
        "userinfo-raw-slash",
    ),
    case(
        f"rtsp://admin:Zm9v/YmFy=@{H}/live",
        f"rtsp://admin:***@{H}/live",
        ["Zm9v/YmFy="],
        "userinfo-base64",
    ),
    case(
        "rtsp://admin:hunter22@[fe80::1]:554/live",
        "rtsp://admin:***@[fe80::1]:554/live",
        ["hunter22"],
        "userinfo-ipv6-host",
    ),
    case(
        f"rtsp://{H}:554/cam/realmonitor?channel=1&subtype=0&user=admin&password={ENC}",
        f"rtsp://{H}:554/cam/realmonitor?channel=1&subtype=0&user=***&password=***",
        [RAW],
        "query-encoded",
    ),
    case(
        f"rtsp://{H}/cam?password={RAW}&channel=2",
        f"rtsp://{H}/cam?password=***&channel=2",
        [RAW],
        "query-raw-/@:?",
    ),
    case(
        f"rtsp://{H}/cam?password=hun&ter22&channel=1",
        f"rtsp://{H}/cam?password=***&channel=1",
        ["hun&ter22"],
        "query-raw-ampersand",
    ),
    case(
        f"http://{H}/videostream.cgi?USER=admin&PWD=hunter22&Rate=0",
        f"http://{H}/videostream.cgi?USER=***&PWD=***&Rate=0",
        ["hunter22"],
        "query-upper-case",
    ),
    case(
        f"rtsp://{H}/media.amp;user=admin;PassWord=hunter22;resolution=640x480",
        f"rtsp://{H}/media.amp;user=***;PassWord=***;resolution=640x480",
        ["hunter22"],
        "semicolons",
    ),
    case(
        f"rtsp://{H}/live?%70assword=hunter22&pass%77ord=hunter23&ch=3",
        f"rtsp://{H}/live?%70assword=***&pass%77ord=***&ch=3",
        ["hunter22", "hunter23"],
        "percent-encoded-names",
    ),
    case(
        f"rtsp://{H}/live?password%3Dhunter22&ch=3",
        f"rtsp://{H}/live?password%3D***&ch=3",
        ["hunter22"],
        "percent-encoded-equals",
    ),
    case(
        f"rtsp://{H}:554/user=admin_password=hunter22_channel=1_stream=0.sdp",
        f"rtsp://{H}:554/user=***_password=***_channel=1_stream=0.sdp",
        ["hunter22"],
        "vendor-path-underscores",
    ),
    case(
        f"rtsp://{H}:554/user=admin&password=hunter22&channel=1&stream=0.sdp?",
        f"rtsp://{H}:554/user=***&password=***&channel=1&stream=0.sdp?",
        ["hunter22"],
        "vendor-path-ampersands",
    ),
    case(
        f"rtsp://{H}/user=admin_password={ENC}_channel=1_stream=0.sdp",
        f"rtsp://{H}/user=***_password=***_channel=1_stream=0.sdp",
        [RAW],
        "vendor-path-encoded",
    ),
    case(
        f"rtsp://{H}/user=admin_password=my-pw-token_channel=2_stream=0.sdp",
        f"rtsp://{H}/user=***_password=***_channel=2_stream=0.sdp",
        ["my-pw-token"],
        "vendor-path-value-with-secret-words",
    ),
    case(
        f"rtsp://{H}/user=admin_password=p?ss_channel=1",
        f"rtsp://{H}/user=***_password=***_channel=1",
        ["p?ss"],
        "vendor-path-raw-question-mark",
    ),
    case(
        "https://cam.example.com/live?api_key=abc123&accessToken=xyz789&X-Auth-Token=t0k3n&fps=5",
        "https://cam.example.com/live?api_key=***&accessToken=***&X-Auth-Token=***&fps=5",
        ["abc123", "xyz789", "t0k3n"],
        "tokens-and-keys",
    ),
    case(
        f"http://{H}:81/videostream.cgi?loginuse=admin&loginpas=hunter22",
        f"http://{H}:81/videostream.cgi?loginuse=***&loginpas=***",
        ["hunter22"],
        "loginpas",
    ),
    case(
        f"rtsp://{H}/keyframes/live?monkey=1&key=hunter22&turkey=2",
        f"rtsp://{H}/keyframes/live?monkey=1&key=***&turkey=2",
        ["hunter22"],
        "key-whole-word",
    ),
    case(
        f"rtsp://admin:hunter22@{H}/cam?token=abc123&channel=4",
        f"rtsp://admin:***@{H}/cam?token=***&channel=4",
        ["hunter22", "abc123"],
        "userinfo-and-query",
    ),
]

UNCHANGED = [
    "rtsp://10.0.0.5:554/Streaming/Channels/101",
    "rtsp://10.0.0.5:554/cam/realmonitor?channel=1&subtype=0",
    "rtsp://10.0.0.5/keyframes/key/monkey?monkey=1&keyframe_interval=2&passthrough=1&bypass=0",
    "rtsp://admin@10.0.0.5/live",  # a user and no password
    "rtsp://10.0.0.5/cam?password=&channel=1",  # an empty password: nothing to hide
    "http://10.0.0.5/cam?email=ops@example.com&x=1",
    "0",
    "videos/clip.mp4",
]


@pytest.mark.parametrize(("url", "expected", "secrets"), MASKED)
def test_redact_url_masks_each_credential_and_keeps_the_rest(
    url: str, expected: str, secrets: list[str]
) -> None:
    assert redact_url(url) == expected
    assert_no_secret(redact_url(url), *secrets)
    assert redact_url(expected) == expected, "redacting twice changes nothing"


@pytest.mark.parametrize("url", UNCHANGED)
def test_redact_url_leaves_a_url_without_credentials_alone(url: str) -> None:
    assert redact_url(url) == url


def test_a_raw_at_sign_after_the_host_masks_more_never_less() -> None:
    """A raw "@" in the query could end a password with a raw "/": the mask runs to it."""
    shown = redact_url("rtsp://10.0.0.5:554/cam?password=p@ss&channel=1")
    assert shown == "rtsp://10.0.0.5:554/cam?password=***&channel=1"
    shown = redact_url("rtsp://10.0.0.5:554/cam?password=hunter@22")
    assert_no_secret(shown, "hunter@22")
    assert shown.startswith("rtsp://10.0.0.5:")


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("password", "secret"),
        ("PASSWORD", "secret"),
        ("pass", "secret"),
        ("pwd", "secret"),
        ("passwd", "secret"),
        ("token", "secret"),
        ("auth", "secret"),
        ("key", "secret"),
        ("api_key", "secret"),
        ("apiKey", "secret"),
        ("X-Auth-Token", "secret"),
        ("access_token", "secret"),
        ("%70assword", "secret"),
        ("loginpas", "secret"),
        ("userPassword", "secret"),
        ("user", "user"),
        ("User", "user"),
        ("username", "user"),
        ("usr", "user"),
        ("loginuse", "user"),
        ("monkey", None),
        ("keyframes", None),
        ("keyframe_interval", None),
        ("passthrough", None),
        ("bypass", None),
        ("channel", None),
        ("subtype", None),
        ("stream", None),
        ("author", None),
    ],
)
def test_parameter_names_match_whole_words(name: str, kind: str | None) -> None:
    assert classify_name(name) == kind


def test_redact_text_masks_every_url_in_a_message() -> None:
    text = (
        "open rtsp://admin:hunter22@10.0.0.5/x failed; retrying "
        "rtsp://10.0.0.5/y?user=bob&pwd=hunter23 in 2 s"
    )
    assert redact_text(text) == (
        "open rtsp://admin:***@10.0.0.5/x failed; retrying "
        "rtsp://10.0.0.5/y?user=***&pwd=*** in 2 s"
    )


@pytest.mark.parametrize(
    "url",
    [
        f"rtsp://{H}/cam?user=admin&password={ENC}",
        f"rtsp://{H}/cam;token=abc123",
        f"rtsp://admin:{RAW}@{H}/live",
    ],
)
def test_redacting_a_redacted_message_again_keeps_its_punctuation(url: str) -> None:
    """The capture's reason, "URL: cannot open stream", is redacted again by the event log and
    the CLI: the ":" after a masked query value was masked with it."""
    message = f"{redact_url(url)}: cannot open stream ({redact_url(url)})"
    assert redact_text(message) == message


def test_registered_secrets_are_masked_outside_urls_in_every_form() -> None:
    secret = "Rg4/unique@reg:pw?"
    quoted = urllib.parse.quote(secret, safe="")
    register_secrets(f"rtsp://10.0.0.5/cam?user=reg-user-name&password={quoted}")
    text = redact_text(f"FFmpeg said {secret} then {quoted}; user reg-user-name")
    assert_no_secret(text, secret)
    assert "reg-user-name" in text, "user names are masked in URLs, not registered"


def test_url_secrets_are_the_secrets_not_the_user_names_nor_the_mask() -> None:
    assert url_secrets("rtsp://cam/x?usr=bob&pwd=p%40ss") == {"p%40ss", "p@ss"}
    assert url_secrets("rtsp://admin:***@cam/x?password=***") == set()
    assert url_secrets("rtsp://admin:ab@cam/x") == set(), "too short to mask in free text"


SETTINGS = settings(max_examples=200, deadline=None, database=None, derandomize=True)
# A generated password, between two markers found nowhere else in the URLs: the mask covers both.
CHARACTERS = st.one_of(
    st.sampled_from("/?#@:&;=%_.-+*~!$'()[], "),
    st.characters(codec="utf-8", exclude_categories=("Cs",)),
)
PASSWORDS = st.text(alphabet=CHARACTERS, max_size=12).map(lambda middle: f"Qz9{middle}Xw8")
PLACES = {
    "userinfo": "rtsp://admin:{pw}@10.0.0.5:554/live?channel=1",
    "query": "rtsp://10.0.0.5:554/cam?channel=1&user=admin&password={pw}&subtype=0",
    "semicolons": "rtsp://10.0.0.5:554/cam;user=admin;pwd={pw};channel=1",
    "vendor-path": "rtsp://10.0.0.5:554/user=admin_password={pw}_channel=1_stream=0.sdp",
}
EXPECTED = {
    "userinfo": "rtsp://admin:***@10.0.0.5:554/live?channel=1",
    "query": "rtsp://10.0.0.5:554/cam?channel=1&user=***&password=***&subtype=0",
    "semicolons": "rtsp://10.0.0.5:554/cam;user=***;pwd=***;channel=1",
    "vendor-path": "rtsp://10.0.0.5:554/user=***_password=***_channel=1_stream=0.sdp",
}


@pytest.mark.parametrize("place", PLACES)
@SETTINGS
@given(password=PASSWORDS)
def test_any_percent_encoded_password_is_masked_exactly(place: str, password: str) -> None:
    url = PLACES[place].format(pw=urllib.parse.quote(password, safe=""))
    assert redact_url(url) == EXPECTED[place]


@SETTINGS
@given(password=PASSWORDS.filter(lambda pw: not any(c.isspace() for c in pw)))
def test_any_raw_userinfo_password_leaks_nothing(password: str) -> None:
    """Raw, the password may hold "/", "?", "#", "@" or ":", which end the authority early."""
    shown = redact_url(PLACES["userinfo"].format(pw=password))
    assert "Qz9" not in shown and "Xw8" not in shown, shown
    assert_no_secret(shown, password)


@SETTINGS
@given(password=PASSWORDS.filter(lambda pw: not any(c in "&;=%" or c.isspace() for c in pw)))
def test_any_raw_query_password_leaks_nothing(password: str) -> None:
    shown = redact_url(PLACES["query"].format(pw=password))
    assert "Qz9" not in shown and "Xw8" not in shown, shown
    if "@" not in password:  # a raw "@" may look like the end of a userinfo: masked to it
        assert shown == EXPECTED["query"]


def test_redaction_imports_nothing_from_sources_or_opencv() -> None:
    """Sinks can use it without importing sources (and OpenCV with them)."""
    code = (
        "import sys, streamdet.redaction; "
        "print(sorted(m for m in sys.modules if m.startswith('streamdet') or m == 'cv2'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "['streamdet', 'streamdet.redaction']"


def test_sources_reexports_the_redaction_functions() -> None:
    for name in ("redact_url", "redact_text", "register_secrets"):
        assert getattr(streamdet.sources, name) is getattr(streamdet.redaction, name)


@pytest.mark.parametrize(
    "module", [streamdet.redaction, streamdet.sources], ids=lambda module: module.__name__
)
def test_docstring_examples_run(module) -> None:
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    ("url", "name"),
    [
        (f"rtsp://10.0.0.5:554/cam?user=admin&password={ENC}", "10.0.0.5_cam"),
        (
            f"rtsp://10.0.0.5/user=admin_password={ENC}_channel=1_stream=0.sdp",
            "10.0.0.5_channel_1_stream_0.sdp",
        ),
        (
            "rtsp://10.0.0.5/user=admin_password=hunter22_channel=1_stream=0.sdp",
            "10.0.0.5_channel_1_stream_0.sdp",
        ),
        (f"rtsp://admin:{RAW}@10.0.0.5:554/live", "10.0.0.5_live"),
        ("rtsp://admin:pa/ss@10.0.0.5/live", "10.0.0.5_live"),
        ("rtsp://10.0.0.5/media.amp;user=admin;password=hunter22", "10.0.0.5_media.amp"),
        ("rtsp://10.0.0.5:554/cam?password=hunter@22", "10.0.0.5"),
        ("rtsp://[::1", "stream"),
    ],
)
def test_a_source_name_is_never_made_from_a_secret(url: str, name: str) -> None:
    assert source_name(url, set()) == name
    assert_no_secret(name, RAW, "hunter22", "pa/ss", "ss", "hunter@22")


def unreachable(url_template: str) -> str:
    """``url_template`` on a port where nothing listens: the open fails at once."""
    return url_template.format(host="127.0.0.1:1")


ORIGIN_URLS = [
    pytest.param("rtsp://{host}/cam?user=admin&password=" + ENC, id="query"),
    pytest.param(
        "rtsp://{host}/user=admin_password=" + ENC + "_channel=1_stream=0.sdp", id="vendor-path"
    ),
    pytest.param("rtsp://admin:" + RAW + "@{host}/live", id="userinfo-raw"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("template", ORIGIN_URLS)
def test_the_open_error_of_a_stream_names_it_without_its_password(template: str) -> None:
    with pytest.raises(SourceError) as caught:
        OpenCVSource(unreachable(template), open_timeout_s=2.0)
    message = str(caught.value)
    assert "cannot open stream" in message and "***" in message
    assert_no_secret(message, RAW)


@pytest.mark.parametrize("template", ORIGIN_URLS)
def test_an_opencv_exception_quoting_the_url_is_redacted_where_it_is_caught(
    template: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenCV raised cv2.error with the URL in its message: SourceError quoted it unredacted."""
    url = unreachable(template)

    def raising(*args, **kwargs):
        raise cv2.error(
            f"OpenCV(4.10) cap_ffmpeg_impl.hpp:1 open: can't open '{url}'\n"
            f"decoded: '{urllib.parse.unquote(url)}' password {RAW}"
        )

    monkeypatch.setattr(cv2, "VideoCapture", raising)
    with pytest.raises(SourceError) as caught:
        OpenCVSource(url)
    message = str(caught.value)
    assert "cannot open (OpenCV(4.10)" in message
    assert_no_secret(message, RAW)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("template", ORIGIN_URLS)
def test_capture_status_reasons_and_log_lines_never_quote_the_password(
    template: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream that cannot be opened: its offline reason and the retry's log lines."""
    caplog.set_level(logging.DEBUG)
    statuses: list[StatusChange] = []
    offline = threading.Event()

    def on_status(change: StatusChange) -> None:
        statuses.append(change)
        if change.status is Status.OFFLINE:
            offline.set()

    url = unreachable(template)
    name = source_name(url, set())
    ring = RingBuffer(name, length=16, stride=8, frame_shape=(3, 112, 112))
    capture = CaptureThread(
        name,
        make_opener(url, open_timeout_s=2.0),
        ring,
        PreprocessContract(),
        threading.Event(),
        kind=SourceKind.STREAM,
        pacing=Pacing.LIVE,
        on_status=on_status,
    )
    capture.start()
    deadline = time.monotonic() + 30
    while not offline.wait(0.1) and time.monotonic() < deadline and capture.is_alive():
        pass
    capture.stop_event.set()
    capture.join(10)

    assert offline.is_set(), [s.reason for s in statuses]
    reasons = " | ".join(s.reason for s in statuses)
    assert "cannot open stream" in reasons and "***" in reasons
    for text in (reasons, caplog.text, name):
        assert_no_secret(text, RAW)
