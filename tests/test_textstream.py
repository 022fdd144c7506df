"""TextStream: incremental detokenization gives exactly what decoding the whole output gives, released in
pieces, multi-byte characters included, cut at the earliest stop string."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_qwen_vision.model import load_processor
from ds_qwen_vision.engine.textstream import TextStream

TEXTS = ["Hello, world! héllo wörld", "世界你好，一二三四五六七八九十", "emoji 🙂🚀 and ZWJ 👩‍👩‍👧 done",
         "tabs\tand\nnew lines\n\n end", "<think>reasoning here</think>\n\nthe answer"]


@pytest.fixture(scope="module")
def tokenizer(tiny_ckpt):
    return load_processor(tiny_ckpt).tokenizer


def stream_all(tokenizer, ids, stop=(), in_reasoning=False):
    ts = TextStream(tokenizer, list(stop), in_reasoning)
    reasoning, content = [], []
    for token in ids:
        r, c = ts.add(token)
        reasoning.append(r)
        content.append(c)
        if ts.stopped:
            break
    r, c = ts.finish()
    return "".join(reasoning) + r, "".join(content) + c, ts


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_add_up_to_the_whole_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    _, content, ts = stream_all(tokenizer, ids)
    assert content == tokenizer.decode(ids, skip_special_tokens=True)
    assert ts.prefix_at <= ts.read_at <= len(ids)  # only a window is decoded per token


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_token_sequence_and_stop_strings(tokenizer, data):
    vocab = len(tokenizer)
    ids = data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=40))
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    # (U+FFFD excluded: it stands for an incomplete character, which the stream never matches)
    chars = st.characters(blacklist_characters="\ufffd")
    stops = data.draw(st.lists(st.text(chars, min_size=1, max_size=3), max_size=2))
    if data.draw(st.booleans()) and len(whole) > 4:  # a stop string that does occur
        i = data.draw(st.integers(0, len(whole) - 2))
        stop = whole[i:i + data.draw(st.integers(1, 3))]
        if "\ufffd" not in stop:
            stops.append(stop)
    _, content, ts = stream_all(tokenizer, ids, stops)
    cut = min((i for i in (whole.find(s) for s in stops) if i != -1), default=-1)
    if cut == -1:
        assert content == whole and not ts.stopped
    else:
        # The stream ends at the first token completing a stop string: the text before it is the same.
        assert ts.stopped and whole.startswith(content) and len(content) == cut
