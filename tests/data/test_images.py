"""Image references: resolution under the root, data URLs, verification and size guards."""

import base64
import os

import pytest

from dimoe.data.images import ImageError, decode_image, load_image_bytes, verify_image

from .conftest import png_bytes, png_header_only


@pytest.fixture()
def root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.png").write_bytes(png_bytes((12, 10)))
    (tmp_path / "secret.png").write_bytes(png_bytes())
    return root


def reason(ref, root, **limits):
    with pytest.raises(ImageError) as err:
        load_image_bytes(ref, root, **limits)
    return err.value.reason


def test_relative_path_and_data_url_give_original_bytes(root):
    data, width, height = load_image_bytes("sub/ok.png", root)
    assert (width, height) == (12, 10) and data == (root / "sub" / "ok.png").read_bytes()
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert load_image_bytes(url, None) == (data, 12, 10)
    image = decode_image(data)
    assert image.mode == "RGB" and image.size == (12, 10)


def test_escapes_are_refused(root):
    assert reason("../secret.png", root) == "image_outside_root"
    assert reason("sub/../../secret.png", root) == "image_outside_root"
    assert reason(str(root / "sub" / "ok.png"), root) == "image_outside_root"  # absolute, even inside
    os.symlink(root.parent / "secret.png", root / "link.png")
    assert reason("link.png", root) == "image_outside_root"


def test_missing_remote_and_rootless(root):
    assert reason("sub/none.png", root) == "missing_image"
    assert reason("http://example.com/x.png", root) == "unsupported_image_ref"
    assert reason("sub/ok.png", None) == "unsupported_image_ref"
    assert reason("data:text/plain;base64,aGk=", None) == "bad_image_ref"
    assert reason("data:image/png;base64,%%%", None) == "bad_image_ref"


def test_broken_and_oversized_images(root):
    good = png_bytes((32, 32))
    (root / "cut.png").write_bytes(good[: len(good) // 2])
    (root / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    (root / "junk.png").write_bytes(b"\x89PNG not really")
    assert reason("cut.png", root) == "bad_image"
    assert reason("bomb.png", root) == "image_too_large"
    assert reason("junk.png", root) == "bad_image"
    assert reason("sub/ok.png", root, max_pixels=100) == "image_too_large"
    assert reason("sub/ok.png", root, max_bytes=10) == "image_too_large"


def test_declared_size_is_checked_before_decoding():
    # 8000×8000 passes Pillow's own bomb check (89 Mpx) but not ours; nothing gets decoded.
    with pytest.raises(ImageError) as err:
        verify_image(png_header_only(8000, 8000), max_pixels=4096 * 4096)
    assert err.value.reason == "image_too_large" and "8000x8000" in str(err.value)
