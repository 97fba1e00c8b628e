"""Training images as they are meant to look: every mode PIL opens read by its real range to 8-bit RGB, transparency
over white, EXIF orientation applied (train.to_rgb, train.to_square_rgb, train.load_images)."""
import numpy as np
import pytest
from PIL import Image

import train


def pixel(im, xy=(0, 0)):
    return train.to_rgb(im).getpixel(xy)


def test_16_bit_gray_gradient_stays_a_gradient(tmp_path):
    """A 16-bit PNG (what a scanner or a raw converter writes) is read by 0..65535, not clipped to white at 255."""
    ramp = np.linspace(0, 65535, 16).round().astype(np.uint16)
    Image.fromarray(np.tile(ramp, (16, 1))).save(tmp_path / "gray16.png")
    with Image.open(tmp_path / "gray16.png") as im:
        assert im.mode in ("I;16", "I")  # Pillow opens 16-bit PNGs as one or the other, by version
        im.load()
        rgb = train.to_square_rgb(im, 16)
    assert np.array_equal(rgb[0, :, 0], (ramp / 257).round().astype(np.uint8))
    assert (rgb == rgb[..., :1]).all()  # gray
    x, _ = train.load_images(str(tmp_path), 16)
    assert x[0, 0, 0, 0] == -1 and x[0, 0, 0, -1] == 1 and len(set(x[0, 0, 0].tolist())) == 16


@pytest.mark.parametrize("mode,value,rgb", [
    ("I;16", 32896, (128, 128, 128)),    # 32896 = 128 · 257
    ("I;16B", 65535, (255, 255, 255)),
    ("I;16B", 257, (1, 1, 1)),
    ("I", 32896, (128, 128, 128)),        # 16-bit data in Pillow's 32-bit mode
    ("F", 0.5, (128, 128, 128)),          # a float image in [0, 1]
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("CMYK", (0, 0, 0, 255), (0, 0, 0)),
    ("L", 77, (77, 77, 77)),
    ("1", 1, (255, 255, 255)),
    ("LA", (50, 255), (50, 50, 50)),
    ("LA", (50, 0), (255, 255, 255)),     # transparent: white
    ("RGBA", (10, 20, 30, 0), (255, 255, 255)),
    ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
    ("YCbCr", (255, 128, 128), (255, 255, 255)),
])
def test_a_known_pixel_of_every_mode(mode, value, rgb):
    if mode in ("I;16B", "I"):  # Image.new cannot fill these
        im = Image.fromarray(np.full((2, 2), value, dtype=">u2" if mode == "I;16B" else np.int32))
    else:
        im = Image.new(mode, (2, 2), value)
    assert im.mode == mode
    assert pixel(im) == rgb


def test_palette_images_with_and_without_transparency():
    p = Image.new("P", (2, 1))
    p.putpalette([200, 0, 0, 0, 0, 200])
    p.putpixel((1, 0), 1)
    assert pixel(p) == (200, 0, 0) and pixel(p, (1, 0)) == (0, 0, 200)
    p.info["transparency"] = 1  # palette index 1 transparent, as in a GIF
    assert pixel(p) == (200, 0, 0) and pixel(p, (1, 0)) == (255, 255, 255)
    pa = Image.new("PA", (1, 1), (1, 0))
    pa.putpalette([200, 0, 0, 0, 0, 200])
    assert pixel(pa) == (255, 255, 255)
    pa.putpixel((0, 0), (1, 255))
    assert pixel(pa) == (0, 0, 200)


def test_a_transparent_colour_of_an_rgb_or_gray_png_is_white(tmp_path):
    """PNG's tRNS chunk: one colour (RGB) or gray level (L) marked transparent, no alpha band."""
    for mode, key, other, rgb in (("RGB", (10, 20, 30), (40, 50, 60), (40, 50, 60)), ("L", 10, 40, (40, 40, 40))):
        im = Image.new(mode, (2, 1), key)
        im.putpixel((1, 0), other)
        im.save(tmp_path / "key.png", transparency=key)
        with Image.open(tmp_path / "key.png") as im:
            im.load()
            assert im.mode == mode and "transparency" in im.info
            assert pixel(im) == (255, 255, 255) and pixel(im, (1, 0)) == rgb


def test_float_images_outside_0_1_by_their_own_range():
    """A float image whose values leave [0, 1] (Pillow's F of an 8-bit image holds 0..255) is read by its [min, max]:
    a gradient, not all white."""
    f = Image.fromarray(np.array([[-2.0, 0.0, 2.0, 6.0]], dtype=np.float32))
    assert [pixel(f, (i, 0))[0] for i in range(4)] == [0, 64, 128, 255]
    eight_bit = Image.fromarray(np.array([[0, 51, 255]], dtype=np.uint8)).convert("F")
    assert [pixel(eight_bit, (i, 0))[0] for i in range(3)] == [0, 51, 255]
    wide = Image.fromarray(np.array([[0, 1 << 20]], dtype=np.int32), "I")  # beyond 16 bits: by its own range too
    assert [pixel(wide, (i, 0))[0] for i in range(2)] == [0, 255]


def test_exif_orientation_is_applied(tmp_path):
    """A phone's portrait photo stored landscape with orientation 6 (rotate 90° clockwise to view): left half red,
    right half blue as stored, so upright the top is red and the bottom blue."""
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    x, _ = train.load_images(str(tmp_path), 16)
    top, bottom = x[0, :, 1, 8].tolist(), x[0, :, -2, 8].tolist()
    assert top[0] > 0.9 and top[2] < -0.9 and bottom[0] < -0.9 and bottom[2] > 0.9, (top, bottom)


def test_cielab_is_refused_naming_the_file(tmp_path):
    """Pillow's convert would read L, a, b as R, G, B: an error, not a wrong image."""
    Image.new("LAB", (4, 4), (50, 128, 128)).save(tmp_path / "lab.tif")
    with pytest.raises(train.cp.CPError, match=r"lab\.tif.*CIELab"):
        train.load_images(str(tmp_path), 16)
