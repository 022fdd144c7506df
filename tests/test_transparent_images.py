"""model.open_image: images with transparency reach the processor composited over white (as Qwen's
qwen-vl-utils and vLLM see them), not with the colours under their transparent pixels; everything else
as transformers' loader. The reference is built with PIL directly (alpha_composite over white)."""
import io
import random

import pytest
import torch
from PIL import Image

from ds_qwen_vision.model import load_processor, open_image


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgba_noise(w: int, h: int, seed: int = 0) -> Image.Image:
    """Random colours and random alpha: fully transparent, half and opaque pixels all present."""
    rng = random.Random(seed)
    img = Image.new("RGBA", (w, h))
    img.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256), rng.choice([0, 40, 128, 255]))
                 for _ in range(w * h)])
    return img


def palette_with_transparency() -> bytes:
    img = rgba_noise(40, 32, 1).convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(img, "PNG", transparency=3)  # palette entry 3 is transparent (a tRNS key)


TRANSPARENT = {
    "rgba_png": encode(rgba_noise(48, 40)),
    "la_png": encode(rgba_noise(40, 48, 2).convert("LA")),
    "p_transparency_png": palette_with_transparency(),
    "pa_tiff": encode(rgba_noise(32, 32, 3).convert("PA"), "TIFF"),
    "rgba_webp": encode(rgba_noise(32, 40, 4), "WEBP", lossless=True),
}


def over_white(data: bytes) -> Image.Image:
    """The reference: PIL's alpha_composite of the decoded image over an opaque white background."""
    img = Image.open(io.BytesIO(data)).convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")


@pytest.fixture(scope="module")
def processor(tiny_ckpt):
    return load_processor(tiny_ckpt)


def pixels(processor, image: Image.Image) -> torch.Tensor:
    return processor(text=[processor.image_token], images=[image], return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("name", TRANSPARENT)
def test_transparent_images_are_composited_over_white(processor, name):
    data = TRANSPARENT[name]
    assert "A" in Image.open(io.BytesIO(data)).mode or "transparency" in Image.open(io.BytesIO(data)).info
    got = pixels(processor, open_image(data))
    assert torch.equal(got, pixels(processor, over_white(data)))
    # The colours under the transparent pixels (a bare convert("RGB") without the transparency key it
    # carries along) give other pixels: the test sees the compositing.
    bare = Image.open(io.BytesIO(data)).convert("RGB")
    bare.info.pop("transparency", None)
    assert not torch.equal(got, pixels(processor, bare))


def test_opaque_images_are_unchanged(processor):
    rgb = rgba_noise(40, 40, 5).convert("RGB")
    for data in (encode(rgb), encode(rgb.convert("L")), encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE))):
        assert torch.equal(pixels(processor, open_image(data)),
                           pixels(processor, Image.open(io.BytesIO(data)).convert("RGB")))
