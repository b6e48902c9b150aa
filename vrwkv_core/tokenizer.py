"""The RWKV World tokenizer: greedy longest match over UTF-8 bytes.

The vocabulary (`rwkv_vocab_v20230424.txt`, bundled) lists `id literal length` per line,
the literal being a Python str or bytes literal; it is parsed with `ast.literal_eval`,
which evaluates literals only. Id 0 is end-of-text, 65535 the image placeholder and 65534
the blank-image placeholder (a row of zeros: v6.0's text-only samples); none is in the file
and all decode to nothing.

Encoding walks a byte trie built from nested dicts: at each position take the longest
vocabulary entry that matches, exactly as the reference trie tokenizer does.
"""

from __future__ import annotations

import ast
import codecs
from functools import lru_cache
from importlib import resources
from pathlib import Path

VOCAB_FILE = "rwkv_vocab_v20230424.txt"
END_OF_TEXT = 0
IMAGE_TOKEN_ID = 65535
BLANK_IMAGE_TOKEN_ID = 65534  # a zero embedding row (not in the vocabulary)
DOUBLE_NEWLINE = 261


def _parse_vocab(text: str, source: str) -> dict[int, bytes]:
    vocab: dict[int, bytes] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            idx = int(line[: line.index(" ")])
            literal = ast.literal_eval(line[line.index(" ") : line.rindex(" ")].strip())
            length = int(line[line.rindex(" ") :])
        except (ValueError, SyntaxError) as err:
            raise ValueError(f"{source}:{lineno}: malformed vocabulary line ({err})") from None
        token = literal.encode("utf-8") if isinstance(literal, str) else literal
        if not isinstance(token, bytes) or len(token) != length:
            raise ValueError(f"{source}:{lineno}: token length {len(token)} != declared {length}")
        vocab[idx] = token
    return vocab


class RWKVTokenizer:
    """World tokenizer: `encode(str) -> list[int]`, `decode(list[int]) -> str`."""

    def __init__(self, vocab_path: str | Path | None = None) -> None:
        if vocab_path is None:
            text = resources.files("vrwkv_core").joinpath(VOCAB_FILE).read_text(encoding="utf-8")
            source = VOCAB_FILE
        else:
            text = Path(vocab_path).read_text(encoding="utf-8")
            source = str(vocab_path)
        self.idx_to_token = _parse_vocab(text, source)
        self.vocab_size = 65536
        # Trie node: dict byte -> [token id at that node or -1, child dict].
        self._root: dict[int, list] = {}
        for idx, token in self.idx_to_token.items():
            node = self._root
            entry = None
            for byte in token:
                entry = node.get(byte)
                if entry is None:
                    entry = node[byte] = [-1, {}]
                node = entry[1]
            assert entry is not None
            entry[0] = idx

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of raw bytes (greedy longest match)."""
        root = self._root
        out: list[int] = []
        append = out.append
        pos, n = 0, len(data)
        while pos < n:
            node = root
            best_id, best_end = -1, pos
            i = pos
            while i < n:
                entry = node.get(data[i])
                if entry is None:
                    break
                i += 1
                if entry[0] >= 0:
                    best_id, best_end = entry[0], i
                node = entry[1]
            # Every single byte is in the vocabulary, so best_id is always found.
            append(best_id)
            pos = best_end
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of a string."""
        return self.encode_bytes(text.encode("utf-8"))

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The bytes of the ids; ids outside the vocabulary (0, 65535) give nothing."""
        get = self.idx_to_token.get
        return b"".join(get(int(i), b"") for i in ids)

    def decode(self, ids: list[int]) -> str:
        """Text of the ids; a split UTF-8 character becomes U+FFFD, never an error."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        """An incremental decoder that yields text only at character boundaries."""
        return StreamDecoder(self)


class StreamDecoder:
    """Feeds ids one batch at a time and returns only complete characters (for streaming)."""

    def __init__(self, tokenizer: RWKVTokenizer) -> None:
        self._tok = tokenizer
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: list[int]) -> str:
        """Text completed by these ids (may be empty while a character is incomplete)."""
        return self._dec.decode(self._tok.decode_bytes(ids))

    def flush(self) -> str:
        """Whatever is left (an incomplete character becomes U+FFFD)."""
        return self._dec.decode(b"", final=True)


@lru_cache(maxsize=1)
def default_tokenizer() -> RWKVTokenizer:
    """The bundled World tokenizer, built once per process."""
    return RWKVTokenizer()
