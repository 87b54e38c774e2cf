"""A small RTSP test server: a video file (or a test pattern) as live H.264, looping forever.

Runs with Debian's system python, which has GStreamer's introspection bindings (`gi`)::

    /usr/bin/python3 tests/rtsp_server.py --port 8554 --video tests/.assets/vtest.avi --path /cam
    /usr/bin/python3 tests/rtsp_server.py --port 8554 --pattern --user u --password p
    /usr/bin/python3 tests/rtsp_server.py --port 8554 --video clip.mp4 --switch 30:480x360

How a file is served: for each client, ``ffmpeg -stream_loop -1`` decodes the file to raw I420
frames of ``--size`` at ``--fps`` and writes them to a pipe; the media's ``appsrc`` reads one
frame per buffer and stamps it ``n / fps``. The pipeline is not live, so the RTSP server's sinks
pace it in real time. ``x264enc`` encodes with no B-frames and a keyframe every ``--gop``
frames, so a client (OpenCV's FFmpeg backend) opens the stream in well under a second.

With ``--counter`` (``--video`` only) each frame carries its number in the stream, from 0 for
each client, burnt into the picture as a row of ``COUNTER_BITS`` black or white blocks (most
significant bit first, ``COUNTER_BLOCK`` pixels square, from ``(COUNTER_X, COUNTER_Y)``): a test
reads it back from any decoded frame, a clip's first frame for instance, without OCR
(``tests/media_helpers.py`` ``read_counter``).

Prints ``READY`` on stdout once listening. SIGTERM and SIGINT stop it cleanly (exit status 0).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

ENCODER = "x264enc tune=zerolatency speed-preset=ultrafast bframes=0 key-int-max={gop}"
PAYLOADER = "rtph264pay name=pay0 pt=96 config-interval=1"
# The burnt-in frame counter (--counter): luma blocks, white for 1, black for 0.
COUNTER_BITS = 16
COUNTER_BLOCK = 12
COUNTER_X = 4
COUNTER_Y = 4


def burn_counter(frame: bytearray, width: int, number: int) -> None:
    """Write ``number`` into an I420 frame's luma plane as blocks (see the module docstring)."""
    for bit in range(COUNTER_BITS):
        value = 235 if number >> (COUNTER_BITS - 1 - bit) & 1 else 16
        x = COUNTER_X + bit * COUNTER_BLOCK
        row = bytes([value]) * COUNTER_BLOCK
        for y in range(COUNTER_Y, COUNTER_Y + COUNTER_BLOCK):
            frame[y * width + x : y * width + x + COUNTER_BLOCK] = row


def raw_caps(width: int, height: int, fps: int) -> str:
    return f"video/x-raw,format=I420,width={width},height={height},framerate={fps}/1"


class LoopingFileFeeder:
    """Feeds one media's ``appsrc`` with raw frames of a file that ffmpeg decodes in a loop.

    With ``switch``, ``(frames, width, height)``: after that many frames the stream goes on at
    the new size, in the same session (a camera reconfigured while a client watches).
    """

    def __init__(
        self,
        video: str,
        width: int,
        height: int,
        fps: int,
        switch: tuple[int, int, int] | None = None,
        counter: bool = False,
    ) -> None:
        self.video, self.fps, self.switch, self.counter = video, fps, switch, counter
        self.frame_duration = Gst.SECOND // fps
        self.frames_pushed = 0
        self.ffmpeg: subprocess.Popen[bytes] | None = None
        self._decode(width, height)

    def _decode(self, width: int, height: int) -> None:
        """(Re)start ffmpeg decoding the file at ``width`` x ``height``."""
        if self.ffmpeg is not None:
            self.stop()
        self.width, self.height = width, height
        self.frame_bytes = width * height * 3 // 2  # I420: Y plane + U and V at quarter size
        self.ffmpeg = subprocess.Popen(
            [
                "ffmpeg",
                "-nostdin",
                "-loglevel",
                "error",
                "-stream_loop",
                "-1",
                "-i",
                self.video,
                "-vf",
                f"fps={self.fps},scale={width}:{height}",
                "-pix_fmt",
                "yuv420p",
                "-f",
                "rawvideo",
                "pipe:1",
            ],
            stdout=subprocess.PIPE,
        )

    def on_need_data(self, appsrc: Gst.Element, _length: int) -> None:
        """Push the next frame (at the new size from the switch on); end the stream if ffmpeg
        died."""
        if self.switch is not None and self.frames_pushed == self.switch[0]:
            _, width, height = self.switch
            self._decode(width, height)
            appsrc.set_property("caps", Gst.Caps.from_string(raw_caps(width, height, self.fps)))
        data = self.ffmpeg.stdout.read(self.frame_bytes)
        if len(data) < self.frame_bytes:
            appsrc.emit("end-of-stream")
            return
        if self.counter:
            frame = bytearray(data)
            burn_counter(frame, self.width, self.frames_pushed)
            data = bytes(frame)
        buffer = Gst.Buffer.new_wrapped(data)
        buffer.pts = buffer.dts = self.frames_pushed * self.frame_duration
        buffer.duration = self.frame_duration
        self.frames_pushed += 1
        appsrc.emit("push-buffer", buffer)

    def stop(self, *_args: object) -> None:
        """Kill the ffmpeg decoder (idempotent)."""
        assert self.ffmpeg is not None
        if self.ffmpeg.poll() is None:
            self.ffmpeg.kill()
        self.ffmpeg.wait()
        self.ffmpeg.stdout.close()


class LoopingFileFactory(GstRtspServer.RTSPMediaFactory):
    """Media factory giving each client its own decoder, starting at the file's first frame."""

    def __init__(
        self,
        video: str,
        width: int,
        height: int,
        fps: int,
        gop: int,
        switch: tuple[int, int, int] | None = None,
        counter: bool = False,
    ) -> None:
        super().__init__()
        self.video, self.width, self.height, self.fps = video, width, height, fps
        self.switch, self.counter = switch, counter
        self.feeders: list[LoopingFileFeeder] = []
        caps = raw_caps(width, height, fps)
        self.set_launch(
            f"( appsrc name=src is-live=false format=time caps={caps} "
            f"! queue ! {ENCODER.format(gop=gop)} ! {PAYLOADER} )"
        )
        self.connect("media-configure", self._on_media_configure)

    def _on_media_configure(self, _factory: object, media: GstRtspServer.RTSPMedia) -> None:
        feeder = LoopingFileFeeder(
            self.video, self.width, self.height, self.fps, self.switch, self.counter
        )
        self.feeders.append(feeder)
        appsrc = media.get_element().get_by_name_recurse_up("src")
        appsrc.connect("need-data", feeder.on_need_data)
        media.connect("unprepared", feeder.stop)

    def stop_all(self) -> None:
        """Kill every decoder still running."""
        for feeder in self.feeders:
            feeder.stop()


def make_pattern_factory(
    width: int, height: int, fps: int, gop: int
) -> GstRtspServer.RTSPMediaFactory:
    """A factory serving GStreamer's moving ``ball`` test pattern."""
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(
        f"( videotestsrc pattern=ball is-live=true ! {raw_caps(width, height, fps)} "
        f"! {ENCODER.format(gop=gop)} ! {PAYLOADER} )"
    )
    factory.set_shared(True)
    return factory


def require_basic_auth(
    server: GstRtspServer.RTSPServer,
    factory: GstRtspServer.RTSPMediaFactory,
    user: str,
    password: str,
) -> None:
    """Allow only ``user:password`` (HTTP basic auth) to access and construct the media."""
    token = GstRtspServer.RTSPToken()
    token.set_string("media.factory.role", user)
    auth = GstRtspServer.RTSPAuth()
    auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password), token)
    server.set_auth(auth)
    permissions = GstRtspServer.RTSPPermissions()
    permissions.add_role_from_structure(
        Gst.Structure.new_from_string(
            f"{user}, media.factory.access=(boolean)true, media.factory.construct=(boolean)true"
        )
    )
    factory.set_permissions(permissions)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/cam", help="mount point, e.g. /cam")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--video", help="any video file ffmpeg can decode; served in a loop")
    source.add_argument("--pattern", action="store_true", help="serve videotestsrc instead")
    parser.add_argument("--size", default="320x240", help="WIDTHxHEIGHT of the stream")
    parser.add_argument(
        "--switch",
        metavar="FRAMES:WIDTHxHEIGHT",
        help="--video only: after FRAMES frames each client's stream goes on at "
        "this size, in the same session (a camera reconfigured mid-stream)",
    )
    parser.add_argument("--fps", type=int, default=10)
    parser.add_argument("--gop", type=int, default=10, help="frames between keyframes")
    parser.add_argument(
        "--counter",
        action="store_true",
        help="--video only: burn each frame's number into the picture (see the docstring)",
    )
    parser.add_argument("--user", help="require HTTP basic auth with this user")
    parser.add_argument("--password", help="password for --user")
    args = parser.parse_args(argv)
    if (args.user is None) != (args.password is None):
        parser.error("--user and --password go together")
    if args.switch and not args.video:
        parser.error("--switch needs --video")
    if args.counter and not args.video:
        parser.error("--counter needs --video")
    return args


def parse_size(text: str) -> tuple[int, int]:
    """``"320x240"`` -> ``(320, 240)``."""
    width, height = (int(v) for v in text.split("x"))
    return width, height


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    width, height = parse_size(args.size)
    Gst.init(None)

    if args.video:
        switch = None
        if args.switch:
            frames, size = args.switch.split(":")
            switch = (int(frames), *parse_size(size))
        factory = LoopingFileFactory(
            args.video, width, height, args.fps, args.gop, switch, args.counter
        )
    else:
        factory = make_pattern_factory(width, height, args.fps, args.gop)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    if args.user is not None:
        require_basic_auth(server, factory, args.user, args.password)
    server.get_mount_points().add_factory(args.path, factory)

    loop = GLib.MainLoop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signum, loop.quit)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr)
        return 1
    print("READY", flush=True)
    try:
        loop.run()
    finally:
        if isinstance(factory, LoopingFileFactory):
            factory.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
