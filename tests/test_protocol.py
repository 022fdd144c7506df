"""Request validation and conversion (protocol.py) without HTTP: the engine request it builds,
odd-but-valid images that must pass, and the image checks that must refuse bad bytes cheaply.

The image builders at the top are shared with test_server_api.py.
"""
import base64
import dataclasses
import io
import json
import random
import struct
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from ds_qwen_vision.server.errors import ApiError
from ds_qwen_vision.server.image_tokens import ImageTokens
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


# The demo checkpoints' rule (Qwen3.5/3.6's own preprocessor_config.json values): 32-pixel units, 256^2 to 4096^2 px
RULE = ImageTokens(patch_size=16, merge_size=2, min_pixels=65_536, max_pixels=16_777_216)
SIZES = [(1, 1), (8, 8), (31, 33), (48, 64), (200, 100), (255, 257), (600, 400), (640, 480), (1000, 1000),
         (1023, 17), (4, 796), (1920, 1080), (3000, 15), (4096, 4096), (5000, 4000), (10000, 50), (16000, 9000)]


def flat_png(w: int, h: int) -> bytes:
    return encode(Image.new("RGB", (w, h), "teal"), "PNG")  # compresses to a few KB at any size


def test_image_tokens_are_the_processor_s(tiny_ckpt):
    """The front's count from the size alone is transformers' (the image processor's own patch count, as vLLM
    counts it) and is what the processor produces from the decoded image: pad tokens and the two markers."""
    from ds_qwen_vision.model import chat_inputs, load_processor

    rule = ImageTokens.from_checkpoint(tiny_ckpt)
    assert rule == RULE
    processor = load_processor(tiny_ckpt)
    merged = rule.merge_size ** 2
    for w, h in SIZES:
        assert rule.tokens(w, h) == processor.image_processor.get_number_of_image_patches(h, w) // merged + 2, (w, h)
    tok = processor.tokenizer
    pad, start = tok.convert_tokens_to_ids("<|image_pad|>"), tok.convert_tokens_to_ids("<|vision_start|>")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "hi"}]}]
    for sizes in [((1, 1), (640, 480)), ((48, 64), (1023, 17)), ((200, 100), (4, 796))]:
        ids = chat_inputs(processor, messages, [png(w, h) for w, h in sizes])["input_ids"][0].tolist()
        assert ids.count(pad) + 2 * ids.count(start) == sum(rule.tokens(w, h) for w, h in sizes), sizes


def test_image_tokens_rule_from_checkpoint_files(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"patch_size": 14, "merge_size": 2, "min_pixels": 3136, "max_pixels": 1_003_520,
         "size": {"shortest_edge": 1, "longest_edge": 2}}))  # Qwen2-VL style: min/max_pixels win over size
    assert ImageTokens.from_checkpoint(tmp_path) == ImageTokens(14, 2, 3136, 1_003_520)
    (tmp_path / "preprocessor_config.json").write_text('{"patch_size": 16}')
    assert ImageTokens.from_checkpoint(tmp_path) is None  # unreadable: the engine alone counts
    assert ImageTokens.from_checkpoint(tmp_path / "missing") is None


def test_over_long_images_are_refused_from_their_headers():
    """A prompt whose images alone are over the prompt limit is a 400 context_length_exceeded before any image
    is decoded: an image whose pixel data is cut off is refused for its length, not as a truncated image."""
    limits = dataclasses.replace(LIMITS, image_tokens=RULE, max_prompt_tokens=500, max_image_pixels=16_777_216)
    big = flat_png(1000, 1000)
    assert RULE.tokens(1000, 1000) == 963
    for images in ([big], [big[:120]], [flat_png(640, 480), flat_png(600, 400)[:100]]):
        err = refused(body(messages=user_with_images(*map(data_url, images))), limits)
        assert (err.status, err.code, err.param) == (400, "context_length_exceeded", "messages"), err.message
        assert "this server accepts at most 500 prompt tokens" in err.message
    err = refused(body(messages=user_with_images(data_url(flat_png(640, 480)), data_url(flat_png(600, 400)))), limits)
    assert "are 532 tokens (302 + 230)" in err.message
    # Within the limit: decoded then, and a truncated one refused as such.
    parse_chat_request(body(messages=user_with_images(data_url(flat_png(640, 480)))), limits)
    err = refused(body(messages=user_with_images(data_url(flat_png(640, 480)[:120]))), limits)
    assert err.code == "invalid_image"
    # Without the rule or the limit, images are not counted here (the engine counts the whole prompt).
    for unknown in (dataclasses.replace(limits, image_tokens=None),
                    dataclasses.replace(limits, max_prompt_tokens=None)):
        assert refused(body(messages=user_with_images(data_url(big[:120]))), unknown).code == "invalid_image"
        parse_chat_request(body(messages=user_with_images(data_url(big))), unknown)


def test_too_elongated_images_are_refused_from_their_headers():
    limits = dataclasses.replace(LIMITS, image_tokens=RULE)
    err = refused(body(messages=user_with_images(data_url(png(2000, 4)[:60]))), limits)
    assert (err.status, err.code, err.param) == (400, "invalid_image", "messages[0].content[1].image_url")
    assert "2000x4: its aspect ratio is over the model's image processor's limit of 200:1" in err.message
    parse_chat_request(body(messages=user_with_images(data_url(png(800, 4)))), limits)  # 200:1 itself is fine


def test_limits_from_config(tiny_ckpt, tmp_path, monkeypatch):
    from ds_qwen_vision.config import load_config_json

    cfg = load_config_json(json.dumps({"model": tiny_ckpt, "limits": {"max_prompt_tokens": 300}}))
    limits = RequestLimits.from_config(cfg)
    assert (limits.image_tokens, limits.max_prompt_tokens) == (RULE, 300)
    monkeypatch.setenv("DSQV_CACHE_DIR", str(tmp_path))  # the demo's checkpoint, where launch.sh builds it
    (tmp_path / "demo-tiny-seed0").mkdir()
    (tmp_path / "demo-tiny-seed0" / "preprocessor_config.json").write_text(
        (Path(tiny_ckpt) / "preprocessor_config.json").read_text())
    demo = RequestLimits.from_config(load_config_json("{}"))
    assert (demo.image_tokens, demo.max_prompt_tokens) == (RULE, None)  # null: the planner's, asked at serving


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
