"""Text tokenizers of the multimodal model (paper Sec. 6: the LLaMA-3 tokenizer, 35 text tokens in Table 11).

    tok = build_tokenizer("")                     # ByteTokenizer: UTF-8 bytes 0..255, bos 256, eos 257
    tok = build_tokenizer("llama3/tokenizer.model")  # TiktokenTokenizer: LLaMA-3 BPE, 128,000 ranks + 256 specials
    tok = learn_bpe(captions, 512)                # BPETokenizer: a byte-level BPE learned from the captions
    ids, lengths, truncated = tokenize(tok, ["a cat", "a dog"], 35)  # (N, 35) rows [bos, tokens..., eos, pad...]

- ByteTokenizer needs no file: every UTF-8 byte is a token (vocab 258), so any caption round-trips.
- TiktokenTokenizer reads Meta's LLaMA-3 `tokenizer.model` (a tiktoken BPE file, one `base64(bytes) rank` line per
  token) and adds the 256 LLaMA-3 special tokens as Meta's llama3 tokenizer.py does; tiktoken is imported only here.
- BPETokenizer is a byte-level BPE (GPT-2's byte alphabet, so any caption round-trips) learned from the training
  captions by Hugging Face's `tokenizers` (imported only then): on custom data without the LLaMA-3 file, it makes
  each frequent word one token, as LLaMA-3's BPE does, instead of a run of bytes the model must learn to spell.

A row is [bos, caption tokens..., eos] padded with eos to a fixed length; the padding is never attended (`lengths`
counts the real tokens, BOS and EOS included). `tok.state()` goes into the checkpoint: for the LLaMA-3 tokenizer it
holds the whole file (2 MB) and its sha256, for a learned BPE its JSON and sha256, so a checkpoint samples without
the file and a --tokenizer given at sampling time can be checked against the one it was trained with (`check_same`).
"""
import base64
import binascii
import hashlib
import itertools
import os

import numpy as np
import torch

# Meta's llama3 tokenizer.py pre-tokenizer (needs \p{L}/\p{N}: the `regex` syntax, which tiktoken's engine supports)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_SPECIAL = 256  # Meta: num_reserved_special_tokens


def llama3_special_tokens():
    """The 256 LLaMA-3 special token names in id order (their ids start at len(ranks) = 128000)."""
    return (["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)]
            + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
            + [f"<|reserved_special_token_{i}|>" for i in range(5, NUM_SPECIAL - 5)])


class ByteTokenizer:
    """UTF-8 bytes: ids 0..255 are bytes, 256 = bos, 257 = eos."""
    kind, bos, eos, vocab_size = "bytes", 256, 257, 258

    def encode(self, text):
        return list(text.encode("utf-8"))  # no BOS/EOS: tokenize() adds them

    def encode_batch(self, texts):
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")  # a cut may split a character

    def state(self):
        return {"kind": "bytes"}


def parse_bpe_file(data, name="tokenizer.model"):
    """bytes of a tiktoken BPE file -> {token bytes: rank}; a malformed line is a ValueError naming its number."""
    ranks, seen = {}, set()
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue  # tiktoken's load_tiktoken_bpe skips empty lines too
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error):
            raise ValueError(f"{name}: line {number}: expected 'base64(bytes) rank', got {line[:60]!r}") from None
        if token in ranks or rank in seen or rank < 0:
            raise ValueError(f"{name}: line {number}: duplicate token or rank, or negative rank: {line[:60]!r}")
        ranks[token] = rank
        seen.add(rank)
    if sorted(seen) != list(range(len(seen))):  # the special tokens are numbered from len(ranks)
        raise ValueError(f"{name}: the ranks are not 0..{len(seen) - 1} without gaps")
    return ranks


class TiktokenTokenizer:
    """The LLaMA-3 tokenizer: tiktoken BPE over `tokenizer.model` (a path, or the file's bytes from a checkpoint)."""
    kind = "tiktoken"

    def __init__(self, source):
        try:
            import tiktoken  # optional: only a --tokenizer file needs it
        except ImportError:
            raise ImportError("the --tokenizer file needs tiktoken: pip install tiktoken") from None
        if isinstance(source, bytes):
            self.data, name = source, "<checkpoint tokenizer>"
        else:
            with open(source, "rb") as f:
                self.data, name = f.read(), str(source)
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        ranks = parse_bpe_file(self.data, name)
        specials = {s: len(ranks) + i for i, s in enumerate(llama3_special_tokens())}
        self.enc = tiktoken.Encoding(name=os.path.basename(name), pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=specials)
        self.bos, self.eos = specials["<|begin_of_text|>"], specials["<|end_of_text|>"]
        self.vocab_size = len(ranks) + NUM_SPECIAL

    def encode(self, text):
        return self.enc.encode_ordinary(text)  # captions are plain text: "<|eot_id|>" in one is just characters

    def encode_batch(self, texts):
        return self.enc.encode_ordinary_batch(texts)  # threaded in tiktoken

    def decode(self, ids):
        return self.enc.decode([i for i in ids if i not in (self.bos, self.eos)], errors="replace")

    def state(self):
        return {"kind": "tiktoken", "sha256": self.sha256,
                "file": torch.frombuffer(bytearray(self.data), dtype=torch.uint8)}


BPE_BOS, BPE_EOS = "<|bos|>", "<|eos|>"  # a learned BPE's special tokens, ids 0 and 1
BYTE_ALPHABET = 256  # a byte-level BPE starts from every byte: a vocabulary below 256 + 2 specials learns nothing


def _import_tokenizers():
    try:
        import tokenizers  # optional: only --learn-tokenizer needs it
    except ImportError:
        raise ImportError("--learn-tokenizer needs Hugging Face's tokenizers: pip install tokenizers") from None
    return tokenizers


class BPETokenizer:
    """A byte-level BPE of Hugging Face's tokenizers, from its JSON (learn_bpe's, or a checkpoint's)."""
    kind = "bpe"

    def __init__(self, json_text):
        self.json = json_text
        self.sha256 = hashlib.sha256(json_text.encode()).hexdigest()
        self.tok = _import_tokenizers().Tokenizer.from_str(json_text)
        self.tok.encode_special_tokens = True  # captions are plain text: "<|eos|>" in one is just characters
        self.bos, self.eos = self.tok.token_to_id(BPE_BOS), self.tok.token_to_id(BPE_EOS)
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.tok.decode([i for i in ids if i not in (self.bos, self.eos)])

    def state(self):
        return {"kind": "bpe", "sha256": self.sha256, "json": self.json}


def learn_bpe(captions, vocab_size):
    """A byte-level BPE of at most vocab_size ids (BOS and EOS included) learned from captions (an iterable of str),
    as GPT-2's: whitespace-led words, merges never across words. Deterministic: every rank learns the same one."""
    if vocab_size < BYTE_ALPHABET + 2:
        raise ValueError(f"--learn-tokenizer {vocab_size}: a byte-level BPE needs at least {BYTE_ALPHABET + 2} ids "
                         f"(256 bytes, BOS, EOS)")
    tk = _import_tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_BOS, BPE_EOS], show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(captions, trainer)
    return BPETokenizer(tok.to_str())


def build_tokenizer(path):
    """"" or None -> ByteTokenizer; else the LLaMA-3 tokenizer.model at `path`."""
    if not path:
        return ByteTokenizer()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return TiktokenTokenizer(path)


def from_state(state):
    """Rebuild the tokenizer saved by tok.state() (e.g. from a checkpoint loaded with weights_only=True)."""
    if state["kind"] == "bytes":
        return ByteTokenizer()
    if state["kind"] not in ("tiktoken", "bpe"):
        raise ValueError(f"unknown tokenizer kind {state['kind']!r} in the checkpoint")
    tok = (BPETokenizer(state["json"]) if state["kind"] == "bpe" else
           TiktokenTokenizer(state["file"].numpy().tobytes()))
    if tok.sha256 != state["sha256"]:
        raise ValueError(f"the checkpoint's tokenizer file is corrupt: sha256 {tok.sha256} != {state['sha256']}")
    return tok


def check_same(state, path):
    """A --tokenizer file given at sampling time must be the one the checkpoint was trained with ("": no check)."""
    if not path:
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    if state["kind"] != "tiktoken" or state["sha256"] != sha:
        trained = {"bytes": "the byte tokenizer", "bpe": "a BPE learned from its captions"}.get(
            state["kind"], f"a file with sha256 {state.get('sha256')}")
        raise ValueError(f"--tokenizer {path} (sha256 {sha}) is not the tokenizer the checkpoint was trained with "
                         f"({trained})")


def tokenize(tok, captions, length):
    """captions: list of N str -> ids LongTensor (N, length) of rows [bos, tokens..., eos, eos pad...],
    lengths LongTensor (N,) of real tokens (BOS and EOS included), and how many captions were cut to length - 2."""
    if length < 2:
        raise ValueError(f"text length {length} leaves no room for BOS and EOS")
    encoded = tok.encode_batch(list(captions))
    truncated = sum(len(t) > length - 2 for t in encoded)
    rows = [t[:length - 2] for t in encoded]
    lengths = np.fromiter((len(t) + 2 for t in rows), np.int64, len(rows))  # (N,)
    ids = np.full((len(rows), length), tok.eos, dtype=np.int64)  # EOS after the caption, then EOS padding
    ids[:, 0] = tok.bos
    col = np.arange(length)
    inside = (col >= 1) & (col < lengths[:, None] - 1)  # (N, length): the caption's slots, row-major = rows' order
    ids[inside] = np.fromiter(itertools.chain.from_iterable(rows), np.int64)  # numpy: ~10x faster than lists
    return torch.from_numpy(ids), torch.from_numpy(lengths), truncated


def detokenize(tok, rows):
    """Generated ids (lists, after BOS) -> strings, each cut at its first EOS: the inverse of tokenize's rows."""
    return [tok.decode(row[:row.index(tok.eos)] if tok.eos in row else row) for row in rows]
