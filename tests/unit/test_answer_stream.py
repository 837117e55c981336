"""Streamed deltas join to exactly the plain answer with a LLaMA-style tokenizer, whose byte-fallback pieces decode as
a run: `<0x39>` alone is "9", but followed by `<0xB9>` both bytes become U+FFFD."""
import pytest

from llava_core.inference.answer_stream import AnswerStream
from llava_core.inference.decoding import DecodingParams
from llava_core.inference.engine import BYTE_FALLBACK_TOKEN


@pytest.fixture(scope="module")
def tokenizer(tiny_dataset):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dataset["llm"])


def stream_all(tokenizer, pieces: list[str]) -> tuple[str, str]:
    ids = tokenizer.convert_tokens_to_ids(pieces)
    byte_ids = frozenset(i for token, i in tokenizer.get_vocab().items() if BYTE_FALLBACK_TOKEN.fullmatch(token))
    stream = AnswerStream(DecodingParams(max_tokens=len(ids)), 0, {tokenizer.eos_token_id},
                          lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True), byte_ids)
    deltas = "".join(stream.push(i).delta for i in ids)
    return deltas, tokenizer.decode(ids, skip_special_tokens=True).strip()


@pytest.mark.parametrize("pieces", [
    ["<0x88>", "▁red", "<0x39>", "<0xB9>", "<0x25>", "▁red"],  # what an untrained model emitted: ASCII byte, then junk
    ["▁a", "<0xE2>", "<0x82>", "<0xAC>", "▁red"],  # "€" split over three byte pieces
    ["▁red", "<0x39>"],  # a run still open at max_tokens
])
def test_streamed_deltas_join_to_the_plain_answer_across_byte_pieces(tokenizer, pieces):
    deltas, plain = stream_all(tokenizer, pieces)
    assert deltas == plain


def test_a_byte_run_is_decoded_as_one(tokenizer):
    """The tokenizer's own behaviour that makes holding back necessary (if it changes, the stand-in changed)."""
    ids = tokenizer.convert_tokens_to_ids(["▁red", "<0x39>"])
    assert tokenizer.decode(ids) == "red9"
    assert tokenizer.decode(ids + tokenizer.convert_tokens_to_ids(["<0xB9>"])) == "red\ufffd\ufffd"
