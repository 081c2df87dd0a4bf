"""catdog.data.images.decode_image: any real-world file -> square uint8 RGB, or BadImage with a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from catdog.data.images import BadImage, check_size, decode_image, read_bounded, read_file, resize

from conftest import encode, synthetic_image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def close_to(pixel, colour, tol=30) -> bool:
    return bool(np.all(np.abs(np.asarray(pixel, dtype=int) - np.asarray(colour)) <= tol))


def test_rgb_jpeg_decodes_to_square_uint8(make_jpeg):
    pixels = decode_image(make_jpeg("cat", 0, size=(90, 60)), 48)
    assert pixels.shape == (48, 48, 3)
    assert pixels.dtype == np.uint8
    # a reddish cat stays reddish
    red, green, blue = pixels.reshape(-1, 3).mean(0)
    assert red > green + 60 and red > blue + 60


def test_decode_matches_pil_squash_resize():
    image = synthetic_image("dog", 3, size=(80, 50))
    data = encode(image, "PNG")  # lossless: exact comparison
    expected = np.asarray(image.resize((40, 40), Image.BILINEAR))
    np.testing.assert_array_equal(decode_image(data, 40), expected)


def test_grayscale_becomes_rgb():
    data = encode(Image.new("L", (50, 40), 128), "JPEG")
    pixels = decode_image(data, 32)
    assert pixels.shape == (32, 32, 3)
    assert close_to(pixels[16, 16], (128, 128, 128), tol=3)
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2])


def test_cmyk_jpeg_becomes_rgb():
    data = encode(Image.new("CMYK", (50, 40), (0, 255, 255, 0)), "JPEG")  # CMYK red
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    pixels = decode_image(data, 32)
    assert pixels.shape == (32, 32, 3)
    assert close_to(pixels.reshape(-1, 3).mean(0), RED, tol=10)


def test_palette_png_becomes_rgb():
    image = Image.new("RGB", (50, 40), GREEN).convert("P", palette=Image.ADAPTIVE, colors=4)
    assert image.mode == "P"
    pixels = decode_image(encode(image, "PNG"), 32)
    assert pixels.shape == (32, 32, 3)
    assert close_to(pixels[10, 10], GREEN, tol=2)


def test_palette_png_with_transparency_is_flattened_on_white():
    image = Image.new("P", (40, 40), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, 1 blue
    image.paste(1, (0, 0, 20, 40))  # left half blue, right half red
    data = encode(image, "PNG", transparency=0)  # red is transparent
    pixels = decode_image(data, 40)
    assert close_to(pixels[20, 5], BLUE, tol=2)
    assert close_to(pixels[20, 35], WHITE, tol=2)


def test_rgba_png_is_flattened_on_white():
    image = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red
    image.paste((0, 0, 255, 255), (0, 0, 20, 40))  # opaque blue left half
    pixels = decode_image(encode(image, "PNG"), 40)
    assert pixels.shape == (40, 40, 3)
    assert close_to(pixels[20, 5], BLUE, tol=2)
    assert close_to(pixels[20, 35], WHITE, tol=2)  # not the hidden red


def test_half_transparent_rgba_is_blended():
    image = Image.new("RGBA", (40, 40), (0, 0, 0, 128))  # 50% black over white -> mid grey
    pixels = decode_image(encode(image, "PNG"), 32)
    assert close_to(pixels[16, 16], (127, 127, 127), tol=2)


def test_la_png_becomes_rgb():
    image = Image.new("LA", (40, 40), (0, 0))  # transparent black
    pixels = decode_image(encode(image, "PNG"), 32)
    assert close_to(pixels[5, 5], WHITE, tol=2)


def _corner_image() -> Image.Image:
    """Landscape 80x40, green with a red block in the top-left corner."""
    image = Image.new("RGB", (80, 40), GREEN)
    image.paste(RED, (0, 0, 20, 10))
    return image


def test_exif_orientation_is_applied():
    image = _corner_image()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(image, "JPEG", quality=95, exif=exif.tobytes())
    stored = Image.open(io.BytesIO(data))
    assert stored.size == (80, 40) and stored.getexif()[0x0112] == 6

    pixels = decode_image(data, 40)
    # rotated 90 degrees clockwise: the red block moved from top-left to top-right
    assert close_to(pixels[2, 37], RED, tol=40)
    assert close_to(pixels[2, 2], GREEN, tol=40)
    assert close_to(pixels[37, 2], GREEN, tol=40)
    # and it equals decoding the upright image
    upright = encode(image.transpose(Image.Transpose.ROTATE_270), "JPEG", quality=95)
    assert np.abs(pixels.astype(int) - decode_image(upright, 40).astype(int)).mean() < 3


def test_no_exif_means_no_rotation():
    pixels = decode_image(encode(_corner_image(), "JPEG", quality=95), 40)
    assert close_to(pixels[2, 2], RED, tol=40)
    assert close_to(pixels[2, 37], GREEN, tol=40)


def test_zero_bytes_is_empty():
    with pytest.raises(BadImage) as info:
        decode_image(b"", 32)
    assert info.value.reason == "empty"
    assert str(info.value).startswith("empty")


def test_truncated_jpeg_is_corrupt(make_jpeg):
    data = make_jpeg("dog", 1, size=(120, 100))
    with pytest.raises(BadImage) as info:
        decode_image(data[: len(data) // 2], 32)
    assert info.value.reason == "corrupt"


def test_truncated_png_is_corrupt():
    data = encode(synthetic_image("cat", 2, size=(120, 100)), "PNG")
    with pytest.raises(BadImage) as info:
        decode_image(data[: len(data) // 2], 32)
    assert info.value.reason == "corrupt"


@pytest.mark.parametrize(
    "data", [b"hello, I am a text file\n" * 10, b"\x00" * 64, b"GIF89a garbage", b"\xff\xd8\xff" + b"junk" * 10]
)
def test_non_image_bytes_are_not_an_image(data):
    with pytest.raises(BadImage) as info:
        decode_image(data, 32)
    assert info.value.reason == "not_an_image"


def test_png_signature_with_garbage_is_corrupt():
    with pytest.raises(BadImage) as info:
        decode_image(b"\x89PNG\r\n\x1a\n" + b"x" * 30, 32)
    assert info.value.reason == "corrupt"


@pytest.mark.parametrize("size", [(20, 20), (100, 20), (20, 100)])
def test_image_below_min_size_is_too_small(size):
    data = encode(Image.new("RGB", size, RED), "PNG")
    with pytest.raises(BadImage) as info:
        decode_image(data, 32, min_size=32)
    assert info.value.reason == "too_small"
    assert f"{size[0]}x{size[1]}" in str(info.value)


def test_image_exactly_min_size_is_kept():
    pixels = decode_image(encode(Image.new("RGB", (32, 32), RED), "PNG"), 64, min_size=32)
    assert pixels.shape == (64, 64, 3)


def test_decompression_bomb_is_rejected():
    data = encode(Image.new("1", (12000, 11000)), "PNG")  # 132 Mpx, 16 kB on disk
    assert len(data) < 100_000
    with pytest.raises(BadImage) as info:
        decode_image(data, 32)
    assert info.value.reason == "decompression_bomb"


def test_bad_image_is_a_value_error():
    assert issubclass(BadImage, ValueError)


def test_resize_changes_size_and_keeps_same_size_untouched():
    array = np.asarray(synthetic_image("cat", 0, size=(64, 64)))
    assert resize(array, 64) is array
    small = resize(array, 32)
    assert small.shape == (32, 32, 3) and small.dtype == np.uint8
    np.testing.assert_array_equal(small, np.asarray(Image.fromarray(array).resize((32, 32), Image.BILINEAR)))


# --- the byte cap every reader shares (data.max_image_bytes) ---------------------------------------


class CountingStream(io.BytesIO):
    """A stream that remembers how many bytes were asked of it."""

    requested = 0

    def read(self, size=-1):
        self.requested += size if size >= 0 else len(self.getbuffer())
        return super().read(size)


def test_check_size_allows_the_cap_and_refuses_a_byte_more():
    check_size(100, 100)
    with pytest.raises(BadImage, match=r"too_large: 101 bytes > 100 \(data\.max_image_bytes\)") as info:
        check_size(101, 100)
    assert info.value.reason == "too_large"


def test_read_bounded_refuses_a_declared_size_over_the_cap_without_reading():
    stream = CountingStream(b"x" * 10)
    with pytest.raises(BadImage, match="too_large"):
        read_bounded(stream, declared_size=5_000, max_bytes=1_000)
    assert stream.requested == 0


def test_read_bounded_stops_a_stream_that_holds_more_than_it_declared():
    stream = CountingStream(b"x" * 5_000)
    with pytest.raises(BadImage, match=r"too_large: 1001 bytes > 1000"):
        read_bounded(stream, declared_size=10, max_bytes=1_000)
    assert stream.requested == 1_001  # never more than the cap and one byte


def test_read_bounded_returns_what_fits(make_jpeg):
    data = make_jpeg("cat", 0)
    assert read_bounded(io.BytesIO(data), len(data), len(data)) == data


def test_read_file_goes_by_the_files_size(tmp_path, make_jpeg):
    path = tmp_path / "cat.jpg"
    path.write_bytes(make_jpeg("cat", 1))
    assert read_file(path, path.stat().st_size) == path.read_bytes()
    with pytest.raises(BadImage, match="too_large") as info:
        read_file(path, path.stat().st_size - 1)
    assert info.value.reason == "too_large"
