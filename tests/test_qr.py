"""`orchestra web --qr`: the QR code is encoded by orchestra itself; a real decoder (zbarimg)
reads the text the terminal shows, rendered to a PNG pixel by pixel."""

import os
import shutil
import struct
import subprocess
import sys
import zlib

import pytest

import orchestra
from conftest import ROOT

ZBARIMG = shutil.which("zbarimg")
SCALE = 6  # pixels per module
INK = {" ": (0, 0), "\u2580": (1, 0), "\u2584": (0, 1), "\u2588": (1, 1)}  # (top dark, bottom dark)

needs_zbar = pytest.mark.skipif(
    ZBARIMG is None, reason="needs zbarimg (apt-get install zbar-tools)"
)


def png(rows, path):
    """Write a greyscale PNG of rows of booleans (True = dark), zlib and struct only."""

    def chunk(kind, data):
        return (
            struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data))
        )

    width, height = len(rows[0]) * SCALE, len(rows) * SCALE
    lines = b"".join(
        b"\0" + bytes(0 if dark else 255 for dark in row for _ in range(SCALE))
        for row in rows
        for _ in range(SCALE)
    )
    header = struct.pack("!IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(lines))
        + chunk(b"IEND", b"")
    )


def modules_of(text):
    """The module rows the terminal text shows: each character is two modules high."""
    rows = []
    for line in text.splitlines():
        marks = [INK[ch] for ch in line]
        rows += [[top for top, _ in marks], [bottom for _, bottom in marks]]
    return rows


def decode(text, tmp_path):
    image = tmp_path / "qr.png"
    png(modules_of(text), image)
    done = subprocess.run(
        [ZBARIMG, "--raw", "-q", str(image)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.rstrip("\n")


@needs_zbar
@pytest.mark.parametrize("length", [1, 20, 60, 75, 90, 110, 150, 250, 400])
def test_a_real_decoder_reads_what_the_terminal_shows(tmp_path, length):
    url = ("http://dev-box.tailnet.ts.net:8888/#token=" + "Ab3-_" * 100)[:length]
    assert decode(orchestra.qr_text(url), tmp_path) == url


@needs_zbar
def test_every_mask_decodes(tmp_path, monkeypatch):
    url = "http://127.0.0.1:8888/#token=" + "x" * 43
    for mask in range(8):
        monkeypatch.setattr(
            orchestra.QRCode, "penalty_with", lambda self, m, _mask=mask: 0 if m == _mask else 1
        )
        code = orchestra.QRCode(url)
        assert code.mask == mask
        assert decode("\n".join(code.terminal_lines()), tmp_path) == url


def test_versions_grow_with_the_text_and_have_their_size():
    assert orchestra.QRCode("a").version == 1
    url = "https://dev-box.tailnet.ts.net:8888/#token=" + "t" * 43
    code = orchestra.QRCode(url)
    assert code.size == 17 + 4 * code.version and code.version in range(5, 8)
    with pytest.raises(orchestra.OrchestraError, match="too long"):
        orchestra.QRCode("x" * 3000)


def test_reed_solomon_matches_the_standard_example():
    # ISO/IEC 18004 annex I: "01234567" at version 1-M has these error correction codewords
    data = [
        0x10,
        0x20,
        0x0C,
        0x56,
        0x61,
        0x80,
        0xEC,
        0x11,
        0xEC,
        0x11,
        0xEC,
        0x11,
        0xEC,
        0x11,
        0xEC,
        0x11,
    ]
    ecc = orchestra.rs_remainder(data, orchestra.rs_divisor(10))
    assert ecc == [0xA5, 0x24, 0xD4, 0xC1, 0xED, 0x36, 0xC7, 0x87, 0x2C, 0x55]


def test_quiet_zone_and_colour(tmp_path):
    lines = orchestra.qr_text("hello").splitlines()
    assert lines[0].strip() == "" and lines[-1].strip() == ""
    assert all(line.startswith("    ") for line in lines)
    coloured = orchestra.qr_text("hello", colour=True).splitlines()
    assert all(line.startswith("\x1b[30;107m") and line.endswith("\x1b[0m") for line in coloured)


@needs_zbar
def test_orchestra_web_qr_prints_the_url_then_its_code(fake_repo, tmp_path):
    env = {**os.environ, "NO_COLOR": "1"}
    web = subprocess.Popen([sys.executable, str(ROOT / "orchestra.py"), "web", "--port", "0", "--qr"], cwd=fake_repo,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        url = web.stdout.readline().rstrip("\n")
        assert url.startswith("http://127.0.0.1:") and "#token=" in url
        lines = [web.stdout.readline().rstrip("\n") for _ in orchestra.qr_text(url).splitlines()]
        assert decode("\n".join(lines), tmp_path) == url
    finally:
        web.terminate()
        web.wait(timeout=30)


def test_qr_beyond_loopback_over_plain_http_warns_and_each_start_has_a_new_token(fake_repo):
    env = {**os.environ, "NO_COLOR": "1"}
    tokens = []
    for _ in range(2):
        web = subprocess.Popen([sys.executable, str(ROOT / "orchestra.py"), "web", "--port", "0", "--qr",
                                "--host", "0.0.0.0"], cwd=fake_repo, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
        try:
            url = web.stdout.readline().rstrip("\n")
            tokens.append(url.partition("#token=")[2])
            err = ""
            while "crosses the network in clear" not in err:
                line = web.stderr.readline()
                assert line, err
                err += line
            assert "--tls-cert" in err and "ssh -L" in err
        finally:
            web.terminate()
            web.wait(timeout=30)
    assert len(set(tokens)) == 2 and all(tokens)  # the QR code of a new start holds a new token
