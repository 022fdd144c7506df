"""The OpenAI chat-completions protocol: request models with their validators, the conversion
to the engine's internal request, and the response objects.

All request validation lives here (STYLE rule 4): one rule, one clear message, with ``param``
naming the JSON path (``messages[0].content[1].image_url``).  A request that passes
`parse_chat_request` can be handed to the engine as is; it can no longer fail the chat
template's own checks (system message first, a user query present, no image in a system turn).

Types are strict, as in OpenAI's API: ``"max_tokens": "5"`` is a 400, not a coercion.  Unknown
top-level fields are ignored (OpenAI-compatible servers do so) except a few OpenAI parameters
whose silent omission would change the result (functions, logit_bias): those
are refused as unsupported.

Images arrive as ``data:image/<fmt>;base64,<data>`` URLs.  Their bytes are checked without
trusting them: every image's header is read first (format, size), so that a decompression bomb is
refused, and a prompt whose images alone are over the prompt-token limit too (their token counts
follow from their sizes: `image_tokens`), before any pixel is decoded; only then is each image
decoded once to catch truncation.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import re
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from PIL import Image, UnidentifiedImageError
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, ValidationError, ValidationInfo,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from ds_qwen_vision.config import DeployConfig
from ds_qwen_vision.server.errors import ApiError, BadRequest, ModelNotFound, PayloadTooLarge
from ds_qwen_vision.server.image_tokens import MAX_ASPECT_RATIO, ImageTokens


@dataclass(frozen=True)
class RequestLimits:
    """What validation needs from the deployment config (passed as pydantic's context)."""

    served_model_name: str
    max_new_tokens: int = 1024
    max_images: int = 8
    max_image_pixels: int = 16_777_216
    allowed_image_url_prefixes: tuple[str, ...] = ()
    max_n: int = 4
    # The prompt-token limit (None: not known here; the engine checks every prompt) and the checkpoint's
    # image resize rule (None: unknown): with both, images alone over the limit are refused before decoding.
    max_prompt_tokens: int | None = None
    image_tokens: ImageTokens | None = None

    @classmethod
    def from_config(cls, cfg: DeployConfig) -> RequestLimits:
        """The config's limits, and the resize rule from the checkpoint's preprocessor_config.json.
        limits.max_prompt_tokens null stays None here: the memory planner decides it (app.py asks the engine)."""
        assert cfg.served_model_name is not None
        return cls(served_model_name=cfg.served_model_name,
                   max_new_tokens=cfg.limits.max_new_tokens,
                   max_images=cfg.limits.max_images_per_request,
                   max_image_pixels=cfg.limits.max_image_pixels,
                   allowed_image_url_prefixes=tuple(cfg.security.allowed_image_url_prefixes),
                   max_n=cfg.limits.max_n,
                   max_prompt_tokens=cfg.limits.max_prompt_tokens,
                   image_tokens=ImageTokens.from_checkpoint(cfg.model_dir()))


def _limits(info: ValidationInfo) -> RequestLimits:
    assert isinstance(info.context, RequestLimits), "validate with context=RequestLimits(...)"
    return info.context


# Error types of our own rules; `_api_error` passes them on as the OpenAI ``code``.
_OWN_CODES = frozenset({
    "invalid_value", "invalid_type", "missing_required_parameter", "invalid_role", "unsupported_role",
    "unsupported_content", "unsupported_parameter", "unsupported_value", "too_many_images",
    "invalid_image_url", "unsupported_image_url", "invalid_base64", "invalid_image",
})


def _fail(code: str, message: str) -> PydanticCustomError:
    assert code in _OWN_CODES, code
    # Without a context pydantic uses the template as it is, so braces in ``message`` are safe.
    return PydanticCustomError(code, message)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


# ---------------------------------------------------------------------------------------------
# Content parts
# ---------------------------------------------------------------------------------------------

_DATA_URL = re.compile(r"data:image/([A-Za-z0-9.+-]+);base64,", re.IGNORECASE)


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted for compatibility, unused
    _data: bytes = PrivateAttr(b"")  # decoded bytes (checked later, see `check_image`)
    _b64: str = PrivateAttr("")      # the validated base64 text, forwarded to the engine

    @model_validator(mode="after")
    def _decode_data_url(self, info: ValidationInfo) -> ImageURL:
        m = _DATA_URL.match(self.url)
        if m is None:
            if self.url[:5].lower() == "data:":
                raise _fail("invalid_image_url", "a data URL must look like data:image/<format>;base64,<data>")
            if any(self.url.startswith(p) for p in _limits(info).allowed_image_url_prefixes):
                raise _fail("unsupported_image_url", "remote image fetching is not supported by this "
                            "server; send the image inline as a data:image/<format>;base64,... URL")
            raise _fail("invalid_image_url", "only inline images are accepted: use a "
                        "data:image/<format>;base64,... URL (remote URLs are not fetched)")
        b64 = self.url[m.end():]
        try:
            data = base64.b64decode(b64, validate=True)  # strict: no whitespace, correct padding
        except (binascii.Error, ValueError) as e:
            raise _fail("invalid_base64", f"the image data is not valid base64 ({e})") from None
        if not data:
            raise _fail("invalid_image", "the image data is empty")
        self._data, self._b64 = data, b64
        return self

    @property
    def data(self) -> bytes:
        return self._data

    @property
    def data_b64(self) -> str:
        return self._b64


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _url_as_string(cls, v: Any) -> Any:
        return {"url": v} if isinstance(v, str) else v  # some clients send the URL bare


class _UnsupportedPart(_Strict):
    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, v: Any) -> Any:
        if "type" not in v:
            raise _fail("missing_required_parameter", "content part has no 'type' (expected 'text' or 'image_url')")
        raise _fail("unsupported_content", f"content part type {v['type']!r} is not supported; "
                    "use 'text' or 'image_url'")


def _part_tag(v: Any) -> str | None:
    if not isinstance(v, dict):
        return None
    return {"text": "#text", "image_url": "#image_url"}.get(v.get("type"), "#unsupported")  # type: ignore[arg-type]


# Tags (names starting with "#") show up in pydantic error locations; `_param` drops them.
ContentPart = Annotated[
    Union[Annotated[TextPart, Tag("#text")], Annotated[ImagePart, Tag("#image_url")],
          Annotated[_UnsupportedPart, Tag("#unsupported")]],
    Discriminator(_part_tag, custom_error_type="invalid_type",
                  custom_error_message="each content part must be an object with a 'type'"),
]


# ---------------------------------------------------------------------------------------------
# Tools and structured output (the engine enforces them: engine/tools.py, engine/grammar.py)
# ---------------------------------------------------------------------------------------------

_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule; also keeps the <function=NAME> tag sound


def _function_name(v: str) -> str:
    if not _FUNCTION_NAME.fullmatch(v):
        raise _fail("invalid_value", f"{v[:80]!r} is not a valid function name (1-64 of a-z, A-Z, 0-9, _ and -)")
    return v


class FunctionDefinition(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    _name = field_validator("name")(_function_name)

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        # Qwen's format passes arguments parameter by parameter: the schema must describe an object.
        if v is not None and v.get("type", "object") != "object":
            raise _fail("invalid_value", "a function's parameters must be a JSON schema of type 'object'")
        if v is not None and not isinstance(v.get("properties", {}), dict):
            raise _fail("invalid_type", "'properties' of a function's parameters must be an object")
        return v


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(_Strict):
    name: str
    arguments: str  # a JSON object, as OpenAI sends it

    _name = field_validator("name")(_function_name)

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, v: str) -> str:
        try:
            value = json.loads(v)
        except ValueError as e:
            raise _fail("invalid_value", f"arguments must be a JSON object in a string ({e})") from None
        if not isinstance(value, dict):
            raise _fail("invalid_value", "arguments must be a JSON object in a string")
        return v


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class JsonSchemaFormat(_Strict):
    name: str
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_json_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise _fail("missing_required_parameter", "type 'json_schema' needs 'json_schema'")
        return self


# ---------------------------------------------------------------------------------------------
# Messages and the request
# ---------------------------------------------------------------------------------------------

ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatMessage(_Strict):
    role: str
    # A string is normalised to one text part; None (or absent) is allowed for assistant only.
    content: list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None  # assistant: the calls it made (tools.py)
    tool_call_id: str | None = None           # tool: the call this message answers

    @field_validator("role")
    @classmethod
    def _known_role(cls, v: str) -> str:
        if v == "function":
            raise _fail("unsupported_role", "role 'function' (OpenAI's deprecated function calling) is not "
                        "supported; use tools and 'tool' messages")
        if v not in ROLES:
            raise _fail("invalid_role", f"unknown role {v!r}; expected one of {', '.join(ROLES)}")
        return v

    @field_validator("content", mode="before")
    @classmethod
    def _string_as_text_part(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [{"type": "text", "text": v}]
        if v is not None and not isinstance(v, list):
            raise _fail("invalid_type", "content must be a string or an array of content parts")
        return v

    @model_validator(mode="after")
    def _content_fits_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise _fail("invalid_value", f"only assistant messages carry tool_calls, not a {self.role} message")
        if self.role == "tool" and not self.tool_call_id:
            raise _fail("missing_required_parameter", "a tool message needs 'tool_call_id'")
        if self.content is None:
            if self.role != "assistant":
                raise _fail("missing_required_parameter", f"a {self.role} message needs 'content'")
            return self
        if not self.content:
            raise _fail("invalid_value", "content must not be an empty array")
        if self.role != "user" and any(isinstance(p, ImagePart) for p in self.content):
            raise _fail("invalid_value", f"images are only allowed in user messages, not in a {self.role} message")
        return self

    @property
    def images(self) -> list[ImagePart]:
        return [p for p in self.content or [] if isinstance(p, ImagePart)]


class StreamOptions(_Strict):
    include_usage: bool | None = None


# Parameters of apply_chat_template / the processor: passing one of them as a template kwarg
# would collide with the engine's own call, so they are refused here instead of failing there.
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs",
    "images", "videos", "text", "audio", "add_special_tokens", "raise_exception",
})
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# OpenAI parameters this server does not implement, with the values that mean "not used".
_UNSUPPORTED: dict[str, list[Any]] = {
    "functions": [None, []],
    "function_call": [None, "none", "auto"],
    "logit_bias": [None, {}],
}

_INT64 = 2**63


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: disabled; k >= 1: keep the k most likely
    seed: int | None = Field(None, ge=-_INT64, lt=_INT64)
    stop: list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    n: int | None = Field(None, ge=1)  # at most RequestLimits.max_n
    user: str | None = None
    # ---- sampling: OpenAI's, then vLLM's extensions. Omitted (None): the checkpoint's generation_config
    # values where it has them (the engine fills them in), else OpenAI's defaults.
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)  # needs logprobs: true
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0, le=100, allow_inf_nan=False)
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=2**31)]] | None = Field(None, max_length=64)
    ignore_eos: bool | None = None  # the model's end-of-sequence tokens do not end generation
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # Known but unsupported (see `_UNSUPPORTED`): typed loosely so that the message is "unsupported".
    functions: Any = None
    function_call: Any = None
    logit_bias: Any = None

    @field_validator("messages")
    @classmethod
    def _conversation(cls, messages: list[ChatMessage], info: ValidationInfo) -> list[ChatMessage]:
        if not messages:
            raise _fail("invalid_value", "messages must contain at least one message")
        for i, m in enumerate(messages[1:], start=1):
            if m.role in ("system", "developer"):
                raise _fail("invalid_value", f"a {m.role} message may only be the first message "
                            f"(found one at messages[{i}])")
        if not any(m.role == "user" for m in messages):
            raise _fail("invalid_value", "messages must contain at least one user message")
        limit = _limits(info).max_images
        count = sum(len(m.images) for m in messages)
        if count > limit:
            raise _fail("too_many_images", f"the request has {count} images; this server accepts "
                        f"at most {limit} per request")
        return messages

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _within_server_limit(cls, v: int | None, info: ValidationInfo) -> int | None:
        limit = _limits(info).max_new_tokens
        if v is not None and v > limit:
            raise _fail("invalid_value", f"{v} is more than this server's limit of {limit} new tokens")
        other = info.data.get("max_tokens")  # validated before max_completion_tokens
        if info.field_name == "max_completion_tokens" and None not in (v, other) and v != other:
            raise _fail("invalid_value", f"{v} differs from max_tokens={other}; set only max_completion_tokens")
        return v

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, v: list[Tool] | None) -> list[Tool] | None:
        names = [t.function.name for t in v or []]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise _fail("invalid_value", f"two tools are named {dup!r}")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(cls, v: Any, info: ValidationInfo) -> Any:
        tools = info.data.get("tools") or []  # validated before tool_choice
        if v in ("required",) or isinstance(v, NamedToolChoice):
            if not tools:
                raise _fail("invalid_value", "tool_choice needs tools: the request has none")
        if isinstance(v, NamedToolChoice) and v.function.name not in {t.function.name for t in tools}:
            raise _fail("invalid_value", f"no tool is named {v.function.name!r}")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if v is not None and not isinstance(v, list):
            raise _fail("invalid_type", "stop must be a string or an array of strings")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_rules(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if len(v) > 4:
                raise _fail("invalid_value", f"at most 4 stop sequences are allowed, got {len(v)}")
            if any(s == "" for s in v):
                raise _fail("invalid_value", "stop sequences must not be empty strings")
        return v

    @field_validator("chat_template_kwargs", mode="before")
    @classmethod
    def _template_kwargs(cls, v: Any) -> Any:
        if v is None:
            return v
        if not isinstance(v, dict):
            raise _fail("invalid_type", "chat_template_kwargs must be an object")
        for key, value in v.items():
            if not _IDENTIFIER.fullmatch(key) or key in _RESERVED_TEMPLATE_KWARGS:
                raise _fail("invalid_value", f"{key!r} cannot be set through chat_template_kwargs")
            if not (value is None or isinstance(value, (str, int, float, bool))):
                raise _fail("invalid_type", f"chat_template_kwargs[{key!r}] must be a string, number, "
                            "boolean or null")
        return v

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):
            raise _fail("invalid_value", "stream_options is only allowed when stream is true")
        return v

    @field_validator("n")
    @classmethod
    def _choices_within_limit(cls, v: int | None, info: ValidationInfo) -> int | None:
        limit = _limits(info).max_n
        if v is not None and v > limit:
            raise _fail("invalid_value", f"n={v} is more than this server's limit of {limit} choices")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise _fail("invalid_value", "top_logprobs needs logprobs: true")
        return v

    @field_validator(*_UNSUPPORTED)
    @classmethod
    def _not_used(cls, v: Any, info: ValidationInfo) -> Any:
        assert info.field_name is not None
        unused = _UNSUPPORTED[info.field_name]
        if v not in unused:
            shown = " or ".join(json.dumps(u) for u in unused[1:])
            raise _fail("unsupported_parameter", f"{info.field_name} is not supported by this server "
                        f"(leave it out, or send {shown})")
        return v


# ---------------------------------------------------------------------------------------------
# Image bytes
# ---------------------------------------------------------------------------------------------

# Formats with plain header parsers and decoders; not e.g. EPS, whose load runs Ghostscript.
# ("JPEG" also opens the multi-picture JPEGs (MPO) that many cameras write.)
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
# The pixel limit is enforced by `check_image` itself right after the header is read; Pillow's
# own warning for sizes between its limit and twice its limit would only be noise.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def _open_image(data: bytes, max_pixels: int, param: str) -> Image.Image:
    """The image, its header read (lazy ``Image.open``) and its size checked: nothing decoded yet."""
    # Same value for every request of this process, so setting the global is race-free.
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:  # over twice the limit: Pillow refuses it already
        raise PayloadTooLarge(f"The image at '{param}' has more than {max_pixels} pixels, this "
                              "server's limit.", param=param, code="image_too_large") from None
    except UnidentifiedImageError:  # its message is only the repr of our buffer
        raise BadRequest(f"The data at '{param}' is not an image in a supported format "
                         f"({', '.join(IMAGE_FORMATS)}).", param=param, code="invalid_image") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise BadRequest(f"The data at '{param}' is not an image in a supported format "
                         f"({', '.join(IMAGE_FORMATS)}): {e}.", param=param, code="invalid_image") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        img.close()
        raise BadRequest(f"The image at '{param}' has no pixels ({width}x{height}).", param=param, code="invalid_image")
    if width * height > max_pixels:
        img.close()
        raise PayloadTooLarge(f"The image at '{param}' is {width}x{height} = {width * height} pixels; "
                              f"this server accepts at most {max_pixels}.", param=param, code="image_too_large")
    return img


def image_size(data: bytes, max_pixels: int, param: str) -> tuple[int, int]:
    """(width, height) from the header, refusing what is not an image or is over ``max_pixels``."""
    with _open_image(data, max_pixels, param) as img:
        return img.size


def check_image(data: bytes, max_pixels: int, param: str) -> None:
    """Refuse bytes that are not a decodable image of at most ``max_pixels`` pixels.

    The size comes from the header, so a bomb is refused before its pixels are decoded; then one
    ``load()`` decodes it, under Pillow's own bomb guard set to the same limit, to catch truncated
    or corrupt data.
    """
    with _open_image(data, max_pixels, param) as img:
        try:
            img.load()
        except Image.DecompressionBombError:
            raise PayloadTooLarge(f"The image at '{param}' decodes to more than {max_pixels} pixels.",
                                  param=param, code="image_too_large") from None
        except Exception as e:  # Pillow's decoders raise many types (OSError, SyntaxError, struct.error, ...)
            raise BadRequest(f"The image at '{param}' could not be decoded (truncated or corrupt "
                             f"{img.format} data: {e}).", param=param, code="invalid_image") from None


# ---------------------------------------------------------------------------------------------
# Request parsing: body bytes -> the engine's internal request
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatRequest:
    """A validated request: what the engine gets, plus what only the front needs."""

    engine_request: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool


def parse_chat_request(body: bytes, limits: RequestLimits) -> ChatRequest:
    """Validate a raw request body; raise a typed `ApiError` (400/404/413) on the first problem."""
    try:
        req = ChatCompletionRequest.model_validate_json(body, strict=True, context=limits)
    except ValidationError as e:
        raise _api_error(e) from None
    if req.model != limits.served_model_name:
        raise ModelNotFound(f"The model '{req.model}' does not exist; this server serves "
                            f"'{limits.served_model_name}'.", param="model")
    messages = []
    images: list[tuple[str, bytes, tuple[int, int]]] = []  # (param, bytes, (width, height) from the header)
    for i, msg in enumerate(req.messages):
        parts: list[dict[str, str]] = []
        for j, part in enumerate(msg.content or []):
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            else:
                assert isinstance(part, ImagePart)
                param = f"messages[{i}].content[{j}].image_url"
                images.append((param, part.image_url.data, image_size(part.image_url.data, limits.max_image_pixels,
                                                                      param)))
                parts.append({"type": "image", "data_b64": part.image_url.data_b64})
        # The chat template knows "system" only; OpenAI's "developer" is the same thing.
        message: dict[str, Any] = {"role": "system" if msg.role == "developer" else msg.role, "content": parts}
        if msg.tool_calls:  # the template renders each argument: it reads them as a mapping
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": json.loads(c.function.arguments)}} for c in msg.tool_calls]
        if msg.tool_call_id is not None:
            message["tool_call_id"] = msg.tool_call_id
        messages.append(message)
    _check_image_tokens(images, limits)
    for param, data, _ in images:  # decoded only now, each once
        check_image(data, limits.max_image_pixels, param)
    engine_request = {
        "messages": messages,
        "max_tokens": req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens,
        # Sampling parameters left out stay None: the engine fills in the checkpoint's defaults.
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": -1 if req.top_k == 0 else req.top_k,
        "min_p": req.min_p,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
        "seed": req.seed,
        "stop": req.stop or [],
        "stop_token_ids": req.stop_token_ids or [],
        "ignore_eos": bool(req.ignore_eos),
        "n": req.n or 1,
        "logprobs": bool(req.logprobs),
        "top_logprobs": req.top_logprobs or 0,
        "chat_template_kwargs": req.chat_template_kwargs or {},
    }
    if req.tools:
        engine_request["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
        choice = req.tool_choice or "auto"
        engine_request["tool_choice"] = choice if isinstance(choice, str) else choice.model_dump()
        engine_request["parallel_tool_calls"] = req.parallel_tool_calls is not False
    if req.response_format is not None and req.response_format.type != "text":
        engine_request["response_format"] = req.response_format.model_dump(exclude_none=True, by_alias=True)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return ChatRequest(engine_request, req.model, bool(req.stream), include_usage)


def _check_image_tokens(images: list[tuple[str, bytes, tuple[int, int]]], limits: RequestLimits) -> None:
    """Refuse, from the images' sizes alone, a prompt that cannot fit: images the processor would refuse
    (too elongated), or images whose tokens alone are over the prompt-token limit (the text comes on top;
    the engine counts the whole prompt)."""
    rule = limits.image_tokens
    if rule is None or not images:
        return
    for param, _, (width, height) in images:
        if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
            raise BadRequest(f"The image at '{param}' is {width}x{height}: its aspect ratio is over the model's image "
                             f"processor's limit of {MAX_ASPECT_RATIO}:1.", param=param, code="invalid_image")
    if limits.max_prompt_tokens is None:
        return
    counts = [rule.tokens(width, height) for _, _, (width, height) in images]
    if sum(counts) > limits.max_prompt_tokens:
        each = "" if len(counts) == 1 else f" ({' + '.join(map(str, counts))})"
        raise BadRequest(f"The images in 'messages' alone are {sum(counts)} tokens{each} as the model's image "
                         f"processor resizes them; this server accepts at most {limits.max_prompt_tokens} prompt "
                         "tokens. Send smaller or fewer images.", param="messages", code="context_length_exceeded")


def _param(loc: tuple[Any, ...]) -> str | None:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not part.startswith("#"):  # union tags, see ContentPart
            path += f".{part}" if path else part
    return path or None


_JSON_TYPES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
               list: "an array", dict: "an object", type(None): "null"}


def _api_error(err: ValidationError) -> ApiError:
    """The first validation problem as a 400 with a message naming the parameter."""
    errors = err.errors(include_url=False)
    e = errors[0]
    kind, param, value = e["type"], _param(e["loc"]), e.get("input")
    got = _JSON_TYPES.get(type(value), "")
    if kind == "json_invalid":
        return BadRequest(f"The request body is not valid JSON: {e['ctx']['error']}.", code="invalid_json")
    if param is None and kind == "model_type":
        return BadRequest(f"The request body must be a JSON object, got {got}.", code="invalid_type")
    if kind == "missing":
        message, code = f"Missing required parameter '{param}'.", "missing_required_parameter"
    elif kind in _OWN_CODES:  # our rules' messages say it all
        what = "type" if kind == "invalid_type" else "value"
        message, code = f"Invalid {what} for '{param}': {e['msg']}.", kind
    elif kind.endswith(("_type", "_parsing")):  # pydantic's type checks
        message, code = f"Invalid type for '{param}': {e['msg']}" + (f" (got {got})." if got else "."), "invalid_type"
    else:  # pydantic's value checks: ranges, literals, lengths
        shown = json.dumps(value)[:80] if isinstance(value, (str, int, float)) else got
        message, code = f"Invalid value for '{param}': {e['msg']} (got {shown}).", "invalid_value"
    if len(errors) > 1:
        message += f" ({len(errors) - 1} more problem{'s' if len(errors) > 2 else ''} in this request.)"
    return BadRequest(message, param=param, code=code)


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class CompletionMeta:
    """What every object of one completion shares."""

    id: str
    model: str
    created: int

    @classmethod
    def new(cls, model: str) -> CompletionMeta:
        return cls(new_completion_id(), model, int(time.time()))


def logprobs_object(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """OpenAI's ``choice.logprobs``: the engine's entries (token, logprob, bytes, top_logprobs) under
    ``content`` (every generated token's, the reasoning block's included), or null when not asked for."""
    return None if entries is None else {"content": entries, "refusal": None}


def chat_choice(index: int, content: str, reasoning: str, finish_reason: str,
                logprobs: list[dict[str, Any]] | None = None,
                tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    # OpenAI: a message that only calls tools has content null.
    message: dict[str, Any] = {"role": "assistant", "content": None if tool_calls and not content else content}
    if reasoning:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": logprobs_object(logprobs), "finish_reason": finish_reason}


def chat_completion(meta: CompletionMeta, choices: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
    """The non-streamed answer; ``choices`` from `chat_choice`, one per choice (``n``)."""
    return {"id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
            "choices": choices, "usage": usage}


def assemble_tool_calls(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Streamed tool-call deltas (engine/tools.py) → the message's tool_calls, as a client assembles them."""
    calls: list[dict[str, Any]] = []
    for d in deltas:
        if d["index"] == len(calls):
            calls.append({"id": d["id"], "type": "function",
                          "function": {"name": d["function"]["name"], "arguments": ""}})
        calls[d["index"]]["function"]["arguments"] += d["function"].get("arguments", "")
    return calls


def completion_chunk(meta: CompletionMeta, delta: dict[str, Any], finish_reason: str | None = None,
                     *, with_usage_field: bool = False, index: int = 0,
                     logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs_object(logprobs),
                     "finish_reason": finish_reason}]}
    if with_usage_field:  # OpenAI: with include_usage every chunk carries "usage": null
        chunk["usage"] = None
    return chunk


def usage_chunk(meta: CompletionMeta, usage: dict[str, int]) -> dict[str, Any]:
    return {"id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model,
            "choices": [], "usage": usage}


def model_list(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(model, created)]}


def model_card(model: str, created: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "ds-qwen-vision"}
