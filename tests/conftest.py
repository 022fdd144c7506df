import io

import pytest
from PIL import Image

from ds_qwen_vision.checkpoint import build_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """The project's tiny real-format checkpoint (fp32), built once per test session."""
    return str(build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", seed=0))


def make_image(width: int, height: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A deterministic, non-constant test image (random data, never a flat colour)."""
    import random

    rng = random.Random(seed)
    img = Image.new("RGB", (width, height))
    img.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(width * height)])
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def image_files(tmp_path_factory):
    """Two test images of different sizes and aspect ratios, on disk."""
    d = tmp_path_factory.mktemp("images")
    paths = []
    for i, (w, h) in enumerate([(64, 48), (40, 96)]):
        p = d / f"img{i}.png"
        p.write_bytes(make_image(w, h, seed=i))
        paths.append(str(p))
    return paths
