"""Request validation and conversion (protocol.py) without HTTP: the engine request it builds,
odd-but-valid images that must pass, and the image checks that must refuse bad bytes cheaply.

The image builders at the top are shared with test_server_api.py.
"""
import base64
import io
import json
import random
import struct
import time
import zlib

import pytest
from PIL import Image

from ds_qwen_vision.server.errors import ApiError
from ds_qwen_vision.server.protocol import (CompletionMeta, RequestLimits, chat_choice, chat_completion, check_image,
                                            completion_chunk, parse_chat_request, usage_chunk)

# Expected: images between the limit and twice it trigger Pillow's warning before ours refuses them.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

MODEL = "test-model"
LIMITS = RequestLimits(served_model_name=MODEL, max_new_tokens=64, max_images=3, max_image_pixels=1_000_000,
                       allowed_image_url_prefixes=("https://images.example/",))

# ---------------------------------------------------------------------------------------------
# Image builders
# ---------------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    # Deterministic and incompressible, so that a truncation always cuts into pixel data.
    n = w * h * len(Image.new(mode, (1, 1)).getbands())
    return Image.frombytes(mode, (w, h), random.Random(seed).randbytes(n))


def png(w: int = 8, h: int = 8) -> bytes:
    return encode(noise(w, h), "PNG")


def jpeg(w: int = 8, h: int = 8) -> bytes:
    return encode(noise(w, h), "JPEG")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(w: int = 20000, h: int = 20000) -> bytes:
    """A 1-bit black PNG of w x h pixels: ~50 KB on the wire, 400 M pixels when decoded.
    Written chunk by chunk (one zero row fed h times) so that building it costs ~0.2 s."""
    comp = zlib.compressobj(9)
    row = b"\0" * (1 + (w + 7) // 8)  # filter byte + packed bits
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def data_url(data: bytes, fmt: str = "png") -> str:
    return f"data:image/{fmt};base64,{base64.b64encode(data).decode()}"


def odd_valid_images() -> dict[str, bytes]:
    """Unusual images a real client may send, all of which must pass validation."""
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent
    frames = [Image.new("P", (12, 10), i) for i in range(3)]
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW
    return {
        "1x1": png(1, 1),
        "2000x4": png(2000, 4),
        "4x2000_jpeg": jpeg(4, 2000),
        "cmyk_jpeg": encode(Image.new("CMYK", (16, 16), (10, 20, 30, 40)), "JPEG"),
        "16bit_png": encode(Image.new("I;16", (16, 16), 40000), "PNG"),
        "palette_png": encode(noise(16, 16).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "rgba_transparent": encode(rgba, "PNG"),
        "animated_gif": encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0),
        "exif_rotated_jpeg": encode(noise(16, 8), "JPEG", exif=exif.tobytes()),
        "grayscale_jpeg": encode(noise(16, 16, "L"), "JPEG"),
        "progressive_jpeg": encode(noise(32, 32), "JPEG", progressive=True),
        "webp": encode(noise(16, 16), "WEBP"),
        "bmp": encode(noise(16, 16), "BMP"),
        "tiff": encode(noise(16, 16), "TIFF"),
    }


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def body(**fields) -> bytes:
    req = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    req.update(fields)
    return json.dumps(req).encode()


def user_with_images(*urls, text="what is this?"):
    return [{"role": "user", "content": [{"type": "text", "text": text}] +
             [{"type": "image_url", "image_url": {"url": u}} for u in urls]}]


def refused(raw: bytes, limits: RequestLimits = LIMITS) -> ApiError:
    with pytest.raises(ApiError) as e:
        parse_chat_request(raw, limits)
    return e.value


# ---------------------------------------------------------------------------------------------
# The engine request
# ---------------------------------------------------------------------------------------------


def test_minimal_request_defaults():
    chat = parse_chat_request(body(), LIMITS)
    assert chat.engine_request == {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        # Sampling parameters left out: None, for the engine to fill in from the checkpoint's generation_config.
        "max_tokens": None, "temperature": None, "top_p": None, "top_k": None, "min_p": None,
        "presence_penalty": None, "frequency_penalty": None, "repetition_penalty": None, "seed": None, "stop": [],
        "stop_token_ids": [], "ignore_eos": False, "n": 1, "logprobs": False, "top_logprobs": 0, "chat_template_kwargs": {},
    }
    assert (chat.model, chat.stream, chat.include_usage) == (MODEL, False, False)


def test_full_request_conversion():
    img = png(4, 3)
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"},
                                     {"type": "image_url", "image_url": {"url": data_url(img), "detail": "low"}},
                                     {"type": "image_url", "image_url": data_url(img, "jpeg")}]},  # bare string form
        {"role": "assistant", "content": None},
        {"role": "assistant", "content": [{"type": "text", "text": "b"}], "name": "x", "reasoning_content": "r"},
        {"role": "user", "content": "ünïcödé 你好 🌍"},
    ]
    chat = parse_chat_request(body(
        messages=messages, max_completion_tokens=32, max_tokens=32, temperature=0, top_p=0.5, top_k=0,
        seed=2**63 - 1, stop="END", stream=True, stream_options={"include_usage": True},
        chat_template_kwargs={"enable_thinking": False, "preserve_thinking": True},
        n=3, user="u-1", frequency_penalty=0.5, presence_penalty=-2, tools=[], logprobs=True, top_logprobs=20,
        repetition_penalty=1.1, min_p=0.05, stop_token_ids=[7, 0], ignore_eos=True,
        metadata={"ignored": True}, store=False,  # unknown top-level fields are ignored
    ), LIMITS)
    b64 = base64.b64encode(img).decode()
    assert chat.engine_request == {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image", "data_b64": b64},
                                         {"type": "image", "data_b64": b64}]},
            {"role": "assistant", "content": []},
            {"role": "assistant", "content": [{"type": "text", "text": "b"}]},
            {"role": "user", "content": [{"type": "text", "text": "ünïcödé 你好 🌍"}]},
        ],
        "max_tokens": 32, "temperature": 0.0, "top_p": 0.5, "top_k": -1, "min_p": 0.05, "presence_penalty": -2.0,
        "frequency_penalty": 0.5, "repetition_penalty": 1.1, "seed": 2**63 - 1, "stop": ["END"],
        "stop_token_ids": [7, 0], "ignore_eos": True, "n": 3, "logprobs": True, "top_logprobs": 20,
        "chat_template_kwargs": {"enable_thinking": False, "preserve_thinking": True},
    }
    assert (chat.stream, chat.include_usage) == (True, True)


def test_nullable_optionals_mean_default():
    chat = parse_chat_request(body(temperature=None, top_p=None, max_tokens=None, stop=None, stream=None,
                                   seed=None, n=None, stream_options=None, chat_template_kwargs=None), LIMITS)
    assert chat.engine_request["temperature"] is None and chat.engine_request["stop"] == []


def test_integers_accepted_for_floats_and_top_k():
    req = parse_chat_request(body(temperature=2, top_p=1, top_k=40, max_tokens=64), LIMITS).engine_request
    assert (req["temperature"], req["top_p"], req["top_k"], req["max_tokens"]) == (2.0, 1.0, 40, 64)


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(odd_valid_images()))
def test_odd_but_valid_images_pass(name):
    data = odd_valid_images()[name]
    check_image(data, 16_777_216, "p")
    chat = parse_chat_request(body(messages=user_with_images(data_url(data))), LIMITS)
    assert base64.b64decode(chat.engine_request["messages"][0]["content"][1]["data_b64"]) == data


def test_pixel_limit_is_inclusive():
    check_image(png(100, 100), 10_000, "p")
    with pytest.raises(ApiError) as e:
        check_image(png(101, 100), 10_000, "p")
    assert (e.value.status, e.value.code) == (413, "image_too_large")
    assert "101x100 = 10100 pixels" in e.value.message


def test_decompression_bomb_is_refused_from_its_header():
    bomb = bomb_png()
    assert len(bomb) < 100_000
    for limit in (16_777_216, 300_000_000):  # Pillow's own guard (over 2x), then ours (between 1x and 2x)
        t = time.perf_counter()
        with pytest.raises(ApiError) as e:
            check_image(bomb, limit, "messages[0].content[1].image_url")
        assert time.perf_counter() - t < 0.5  # refused without decoding 400 M pixels
        assert (e.value.status, e.value.code, e.value.param) == (413, "image_too_large",
                                                                 "messages[0].content[1].image_url")


@pytest.mark.parametrize("data, expected", [
    (png(64, 64)[:400], "could not be decoded (truncated or corrupt PNG"),
    (jpeg(64, 64)[:-600], "could not be decoded (truncated or corrupt JPEG"),
    (b"hello, world", "is not an image in a supported format"),
    # EPS is a format Pillow knows, but loading it runs Ghostscript: not among the accepted ones.
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "is not an image in a supported format"),
    (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0)), "not an image"),  # 0 px
])
def test_bad_image_bytes(data, expected):
    with pytest.raises(ApiError) as e:
        check_image(data, 16_777_216, "messages[0].content[1].image_url")
    assert (e.value.status, e.value.code) == (400, "invalid_image")
    assert expected in e.value.message and "messages[0].content[1].image_url" in e.value.message


def test_images_are_counted_before_any_is_decoded():
    # Four bombs, limit three: refused by count, not by decoding four bombs.
    err = refused(body(messages=user_with_images(*[data_url(bomb_png(5000, 5000))] * 4)))
    assert (err.status, err.code, err.param) == (400, "too_many_images", "messages")
    assert "4 images" in err.message and "at most 3" in err.message


def test_image_urls():
    err = refused(body(messages=user_with_images("https://images.example/cat.png")))
    assert (err.status, err.code, err.param) == (400, "unsupported_image_url", "messages[0].content[1].image_url")
    assert "remote image fetching is not supported" in err.message
    err = refused(body(messages=user_with_images("https://elsewhere.example/cat.png")))
    assert (err.code, err.param) == ("invalid_image_url", "messages[0].content[1].image_url")
    err = refused(body(messages=user_with_images("data:image/png;base64,iVBO@w0K")))
    assert (err.code, err.param) == ("invalid_base64", "messages[0].content[1].image_url")
    wrapped = base64.b64encode(png()).decode()[:-1] + " "
    err = refused(body(messages=user_with_images("data:image/png;base64," + wrapped)))
    assert err.code == "invalid_base64"  # strict: whitespace is not base64


# ---------------------------------------------------------------------------------------------
# Errors: shape of the message and the param path
# ---------------------------------------------------------------------------------------------


def test_error_names_the_path():
    err = refused(body(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]))
    assert (err.status, err.code, err.param) == (400, "invalid_type", "messages[0].content[0].text")
    assert err.message == ("Invalid type for 'messages[0].content[0].text': Input should be a valid string "
                           "(got an integer).")


def test_first_problem_reported_with_a_count_of_the_rest():
    err = refused(body(temperature=5, top_p=0))
    assert err.param == "temperature"
    assert err.message == ("Invalid value for 'temperature': Input should be less than or equal to 2 (got 5). "
                           "(1 more problem in this request.)")


def test_wrong_model_is_404():
    err = refused(body(model="gpt-4o"))
    assert (err.status, err.code, err.param) == (404, "model_not_found", "model")
    assert MODEL in err.message


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------


def test_response_objects():
    meta = CompletionMeta.new(MODEL)
    assert meta.id.startswith("chatcmpl-") and isinstance(meta.created, int)
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    done = chat_completion(meta, [chat_choice(0, "hi", "", "stop")], usage)
    assert done["object"] == "chat.completion"
    assert done["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert done["choices"][0]["logprobs"] is None
    two = chat_completion(meta, [chat_choice(0, "hi", "hmm", "length"), chat_choice(1, "yo", "", "stop", [])], usage)
    assert two["choices"][0]["message"]["reasoning_content"] == "hmm"
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert two["choices"][1]["logprobs"] == {"content": [], "refusal": None}
    chunk = completion_chunk(meta, {"content": "x"}, with_usage_field=True)
    assert chunk["object"] == "chat.completion.chunk" and chunk["usage"] is None
    assert "usage" not in completion_chunk(meta, {})
    assert usage_chunk(meta, usage)["choices"] == []
