"""Tests of tokenization.py (byte and LLaMA-3/tiktoken tokenizers) and coco/cider.py (CIDEr-D). No downloads: the BPE
file is a small one written here in the real tokenizer.model layout, and the CIDEr-D values are recomputed by
an independent loop-based transcription of the formula (and, for two images, by hand in the comments)."""
import base64
import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from coco import cider
import tokenization

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout


# ------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_bytes_roundtrip_and_layout():
    tok = tokenization.build_tokenizer("")
    assert (tok.kind, tok.bos, tok.eos, tok.vocab_size) == ("bytes", 256, 257, 258)
    text = "a café — 東京 ☃"
    ids = tok.encode(text)
    # "a café " 8 bytes (é = c3 a9), "— " 4 (U+2014: 3 bytes), "東京 " 7, "☃" 3
    assert ids == list(text.encode("utf-8")) and len(ids) == 22 and all(0 <= i < 256 for i in ids)
    assert ids[:8] == [97, 32, 99, 97, 102, 0xC3, 0xA9, 32] and ids[-3:] == [0xE2, 0x98, 0x83]
    assert tok.decode([tok.bos] + ids + [tok.eos, tok.eos]) == text  # bos/eos are not text
    # length 5 leaves 3 caption slots: "hi" fits, "" is [bos, eos], "héllo" (6 bytes: é is c3 a9) is cut to 3
    ids, lengths, truncated = tokenization.tokenize(tok, ["hi", "", "héllo"], 5)
    assert ids.dtype == lengths.dtype == torch.long and ids.shape == (3, 5)
    assert ids.tolist() == [[256, 104, 105, 257, 257],
                            [256, 257, 257, 257, 257],
                            [256, 104, 0xC3, 0xA9, 257]]
    assert lengths.tolist() == [4, 2, 5] and truncated == 1
    assert tok.decode(ids[2].tolist()) == "hé"
    assert tok.decode(tokenization.tokenize(tok, ["東"], 4)[0][0].tolist()) == "\ufffd"  # 2 of 3 bytes: replaced
    assert tokenization.tokenize(tok, ["abc", "abcd", "ab"], 4)[2] == 2
    with pytest.raises(ValueError):  # length 1 has no room for BOS and EOS
        tokenization.tokenize(tok, ["a"], 1)


def _gpt2_byte_order():
    """The 256 bytes in the order of rank 0..255 in the real LLaMA-3 (and cl100k) files: GPT-2's printable bytes
    first (! .. ~, ¡ .. ¬, ® .. ÿ), then the others in byte order."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    return printable + [b for b in range(256) if b not in printable]


MERGES = [b"ab", b"abc", b" a", b" ab"]  # ranks 256..259; each is the concatenation of lower-ranked tokens


def _write_bpe(path, merges=MERGES):
    tokens = [bytes([b]) for b in _gpt2_byte_order()] + list(merges)
    with open(path, "wb") as f:
        f.write(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(tokens)))
    return len(tokens)


def test_tokenizer_tiktoken_bpe_file(tmp):
    path = os.path.join(tmp, "tokenizer.model")
    n_ranks = _write_bpe(path)
    tok = tokenization.build_tokenizer(path)
    assert tok.kind == "tiktoken" and n_ranks == 260
    assert (tok.bos, tok.eos, tok.vocab_size) == (260, 261, 260 + 256)
    # pre-tokens "abc" " ab" " a" " cab" " é"; by the merges: abc -> ab,c -> abc (257); " ab" -> " ",ab ->
    # " ab" (259); " a" (258); " cab" -> " ",c,ab (no "cab"/" c"): 220 66 256; " é" -> bytes 20 c3 a9, no
    # merges. Ranks of single bytes: '!'..'~' are 0..93 (a = 97 - 33 = 64, c = 66), ¡..¬ 94..105 (0xa9 -> 102),
    # ®..ÿ 106..187 (0xc3 -> 106 + 195 - 174 = 127), then 0..32 from 188 (space = 220)
    text = "abc ab a cab é"
    assert tok.encode(text) == [257, 259, 258, 220, 66, 256, 220, 127, 102], tok.encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|eot_id|>") == tok.encode("<|eot_id") + tok.encode("|>")  # specials are plain text
    names = {260: "<|begin_of_text|>", 261: "<|end_of_text|>", 262: "<|reserved_special_token_0|>",
             265: "<|reserved_special_token_3|>", 266: "<|start_header_id|>", 267: "<|end_header_id|>",
             268: "<|reserved_special_token_4|>", 269: "<|eot_id|>", 270: "<|reserved_special_token_5|>",
             515: "<|reserved_special_token_250|>"}
    for i, name in names.items():
        assert tok.enc.decode_single_token_bytes(i) == name.encode(), i
    assert tok.enc.n_vocab == 516
    ids, lengths, truncated = tokenization.tokenize(tok, ["abc ab", "cab é"], 5)  # 2 and 5 tokens, 3 slots
    assert ids.tolist() == [[260, 257, 259, 261, 261], [260, 66, 256, 220, 261]] and lengths.tolist() == [4, 5]
    assert truncated == 1

    # checkpoint round trip: only plain values and tensors, loadable with weights_only=True
    buf = io.BytesIO()
    torch.save({"tokenizer": tok.state()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["tokenizer"]
    again = tokenization.from_state(state)
    assert again.encode(text) == tok.encode(text) and (again.bos, again.eos) == (260, 261)
    assert tokenization.from_state({"kind": "bytes"}).encode("é") == [0xC3, 0xA9]

    tokenization.check_same(state, path)  # the same file: accepted
    tokenization.check_same(state, "")  # no --tokenizer: nothing to check
    other = os.path.join(tmp, "other.model")
    _write_bpe(other, MERGES + [b"bc"])
    for st, p in ((state, other), ({"kind": "bytes"}, path)):
        with pytest.raises(ValueError) as excinfo:
            tokenization.check_same(st, p)
        e = str(excinfo.value)
        assert p in e and ("byte tokenizer" in e or tok.sha256 in e), e
    # a valid file, not its sha256
    state["file"] = torch.frombuffer(bytearray(open(other, "rb").read()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="sha256"):
        tokenization.from_state(state)


def test_tokenizer_learned_bpe():
    # a byte-level BPE learned from captions: each frequent word one token, any text round-trips, deterministic,
    # through a checkpoint with weights_only=True, and told apart from another one learned elsewhere
    captions = [f"a {s} {c} shape" for s in ("small", "large") for c in ("red", "yellow", "green")] * 20
    tok = tokenization.learn_bpe(captions, 400)
    assert tok.kind == "bpe" and (tok.bos, tok.eos) == (0, 1) and 258 < tok.vocab_size <= 400
    pieces = [tok.tok.id_to_token(i) for i in tok.encode("a large yellow shape")]
    assert pieces == ["a", "\u0120large", "\u0120yellow", "\u0120shape"], pieces  # \u0120: GPT-2's byte of a space
    for text in ("a large yellow shape", "héllo wörld 🐱, <|eos|> and all", ""):
        ids = tok.encode(text)
        assert tok.decode(ids) == text and all(2 <= i < tok.vocab_size for i in ids), (text, ids)
    assert len(tok.encode("a purple shape")) > 4  # an unseen word: several byte tokens, not an unknown token
    again = tokenization.learn_bpe(captions, 400)
    assert again.json == tok.json and again.sha256 == tok.sha256
    ids, lengths, truncated = tokenization.tokenize(tok, ["a small red shape", "a large yellow"], 6)
    assert ids[:, 0].eq(0).all() and lengths.tolist() == [6, 5] and truncated == 0 and ids[1, 4:].eq(1).all()
    buf = io.BytesIO()
    torch.save({"tokenizer": tok.state()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["tokenizer"]
    assert tokenization.from_state(state).encode("a small green shape") == tok.encode("a small green shape")
    assert tokenization.learn_bpe(captions[:7], 400).sha256 != tok.sha256
    with pytest.raises(ValueError, match="learned from its captions"):  # a file at sampling time is not a learned BPE
        tokenization.check_same(state, __file__)
    with pytest.raises(ValueError) as excinfo:  # a vocabulary smaller than the byte alphabet
        tokenization.learn_bpe(captions, 257)
    assert "--learn-tokenizer 257" in str(excinfo.value) and "258" in str(excinfo.value), str(excinfo.value)


def test_tokenizer_bad_files(tmp):
    path = os.path.join(tmp, "tokenizer.model")
    _write_bpe(path)
    lines = open(path, "rb").read().split(b"\n")
    for bad in (b"YWI=", b"YWI= x", b"***= 7", b"YWI= 7 8"):  # no rank, bad rank, bad base64, extra field
        open(path, "wb").write(b"\n".join(lines[:4] + [bad] + lines[5:]))
        with pytest.raises(ValueError, match=re.escape(f"{path}: line 5:")):
            tokenization.build_tokenizer(path)
    open(path, "wb").write(b"\n".join(lines[:4] + [lines[3]] + lines[5:]))  # a duplicate token
    with pytest.raises(ValueError, match="line 5"):
        tokenization.build_tokenizer(path)
    missing = os.path.join(tmp, "nope.model")
    for call in (lambda: tokenization.build_tokenizer(missing),
                 lambda: tokenization.check_same({"kind": "bytes"}, missing)):
        with pytest.raises(FileNotFoundError, match=re.escape(missing)):
            call()


# ------------------------------------------------------------------------------------------ CIDEr-D
def _cider_by_hand(cands, refs):
    """CIDEr-D written out directly: n-grams as joined strings, idf from an explicit loop over the images."""
    def grams(sentence, n):
        w = sentence.split()
        out = {}
        for i in range(len(w) - n + 1):
            key = " ".join(w[i:i + n])
            out[key] = out.get(key, 0) + 1
        return out

    images = list(cands)
    scores = []
    for img in images:
        per_n = []
        for n in range(1, 5):
            def doc_freq(g):
                return sum(1 for other in images if any(g in grams(r, n) for r in refs[other]))

            def tfidf(sentence):
                return {g: c * (math.log(len(images)) - math.log(max(1, doc_freq(g))))
                        for g, c in grams(sentence, n).items()}
            c_vec = tfidf(cands[img])
            c_len = sum(grams(cands[img], 2).values())  # pycocoevalcap's length: the bigram count
            total = 0.0
            for r in refs[img]:
                r_vec = tfidf(r)
                num = 0.0
                for g in c_vec:
                    num += min(c_vec[g], r_vec.get(g, 0.0)) * r_vec.get(g, 0.0)
                den = math.sqrt(sum(v * v for v in c_vec.values())) * math.sqrt(sum(v * v for v in r_vec.values()))
                sim = num / den if den > 0 else num
                total += sim * math.exp(-((c_len - sum(grams(r, 2).values())) ** 2) / (2 * 6.0 ** 2))
            per_n.append(total / len(refs[img]))
        scores.append(10 * sum(per_n) / 4)
    return sum(scores) / len(scores), scores


def test_cider_tiny_corpus_by_hand():
    cands = {"A": "x x y", "B": "w"}
    refs = {"A": ["x y", "x y"], "B": ["z w", "z"]}
    score, scores = cider.cider_d(cands, refs)
    # By hand, L = log 2 (two images; every n-gram is in one image's references, idf = L - log 1 = L):
    # A: cand x:2L y:L | "x x":L "x y":L | "x x y":L; ref "x y": x:L y:L | "x y":L.
    #    n=1: (min(2L,L)L + L*L) / (L sqrt5 * L sqrt2) = 2/sqrt10; n=2: L*L / (L sqrt2 * L) = 1/sqrt2;
    #    n=3,4: the reference has no such n-grams (norm 0) -> 0. Lengths (bigrams) 2 vs 1: penalty exp(-1/72).
    #    Both references alike: 10 * (2/sqrt10 + 1/sqrt2) / 4 * exp(-1/72)
    #    = 2.5 * (0.6324555 + 0.7071068) * 0.9862071 = 2.5 * 1.3395623 * 0.9862071 = 3.3027147
    # B: cand w:L; ref "z w": z:L w:L | "z w":L -> n=1: L*L / (L * L sqrt2) = 1/sqrt2, bigrams 0 vs 1;
    #    ref "z": no shared n-gram -> 0. 10 * (1/sqrt2 * exp(-1/72)) / 4 / 2 = 1.25 * 0.7071068 * 0.9862071
    #    = 0.8716922
    a = 10 * (2 / math.sqrt(10) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    b = 10 * (1 / math.sqrt(2)) * math.exp(-1 / 72) / 4 / 2
    assert abs(a - 3.3027147) < 1e-6 and abs(b - 0.8716922) < 1e-6, (a, b)
    assert abs(scores[0] - a) < 1e-12 and abs(scores[1] - b) < 1e-12, scores
    assert abs(score - (a + b) / 2) < 1e-12
    # a perfect two-word match: 1 for n = 1, 2 and 0 for n = 3, 4 (no trigrams): 10 * 2 / 4 = 5
    assert abs(cider.cider_d({"A": "x y", "B": "w"}, refs)[1][0] - 5.0) < 1e-12
    # one image alone scores 0 (pycocoevalcap's idf: log(1 image) - log(df 1) = 0 for every n-gram)
    assert cider.cider_d({"A": "x y"}, {"A": ["x y"]}) == (0.0, [0.0])

    # three images, two references each, overlapping vocabulary: the independent transcription agrees
    cands = {1: "a man riding a horse on the beach", 2: "a dog on a couch", 3: "two dogs playing in the grass"}
    refs = {1: ["a man rides a horse along the beach", "a person riding a brown horse on a beach"],
            2: ["a small dog sleeping on a couch", "a dog lying on the sofa"],
            3: ["two dogs play in the grass", "a man and two dogs on the grass"]}
    score, scores = cider.cider_d(cands, refs)
    want, want_scores = _cider_by_hand(cands, refs)
    assert all(abs(s - w) < 1e-12 for s, w in zip(scores, want_scores)), (scores, want_scores)
    assert abs(score - want) < 1e-12 and score > 0
    # tokenization: case and the punctuation the COCO tool drops do not change the score
    loud = {k: v.capitalize() + "." for k, v in cands.items()}
    loud_refs = {k: [f'"{r.upper()}!"' for r in v] for k, v in refs.items()}
    assert abs(cider.cider_d(loud, loud_refs)[0] - score) < 1e-12


def test_cider_no_shared_ngram_and_errors():
    cands = {"A": "purple elephants", "B": "a dog on a couch"}
    refs = {"A": ["a man rides a horse", "a person on a horse"], "B": ["a dog on a couch", "a dog on the sofa"]}
    score, scores = cider.cider_d(cands, refs)
    assert scores[0] == 0.0 and scores[1] > 0 and abs(score - scores[1] / 2) < 1e-12
    assert cider.coco_tokenize("A dog's toy, on the table... (it can't) -- 3.5 \"feet\"") == \
        ["a", "dog", "'s", "toy", "on", "the", "table", "it", "ca", "n't", "3.5", "feet"]
    for c, r, word in (({"A": "x", "C": "y"}, refs, "'C'"), ({"A": "x"}, refs, "'B'"), ({"A": "x"}, {"A": []}, "'A'")):
        with pytest.raises(ValueError, match=re.escape(word)):
            cider.cider_d(c, r)


def test_cider_command_line(tmp):
    meta, caps, per = (os.path.join(tmp, n) for n in ("metadata.jsonl", "captions.jsonl", "per.jsonl"))
    rows = [{"file_name": "imgs/a.png", "text": ["a man riding a horse", "a person on a horse"]},
            {"file_name": "b.png", "text": "a dog on a couch"},
            {"file_name": "sub/c.png", "text": ["two dogs in the grass", "dogs playing outside"]}]
    with open(meta, "w") as f:
        f.write(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[2]) + "\n")
    texts = ["a man on a horse", "a dog sleeping on a couch", "two dogs playing"]
    with open(caps, "w") as f:  # by relative path, by base name, by index (2: the third non-empty line)
        for source, text in zip(["imgs/a.png", "b.png", 2], texts):
            f.write(json.dumps({"source": source, "text": text}) + "\n")
    want, want_scores = cider.cider_d(dict(zip("abc", texts)), {k: r["text"] if isinstance(r["text"], list)
                                                                else [r["text"]] for k, r in zip("abc", rows)})
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cider.main([caps, meta, "--per-image", per])
    assert f"CIDEr-D: {want:.6f} (3 images)" in out.getvalue(), out.getvalue()
    lines = [json.loads(line) for line in open(per)]
    assert [x["source"] for x in lines] == ["imgs/a.png", "b.png", 2]
    assert [x["file_name"] for x in lines] == [os.path.normpath(p) for p in ("imgs/a.png", "b.png", "sub/c.png")]
    assert all(abs(x["cider_d"] - s) < 1e-12 for x, s in zip(lines, want_scores))
    run = subprocess.run([sys.executable, "-m", "coco.cider", caps, meta],
                         capture_output=True, text=True, cwd=tmp, env=dict(os.environ, PYTHONPATH=ROOT))
    assert run.returncode == 0 and f"CIDEr-D: {want:.6f}" in run.stdout, run.stdout + run.stderr

    with open(meta, "a") as f:
        f.write('{"file_name": "d.png"}\n{oops\n')  # lines 5 (no text) and 6 (bad JSON)
    run = subprocess.run([sys.executable, "-m", "coco.cider", caps, meta],
                         capture_output=True, text=True, cwd=tmp, env=dict(os.environ, PYTHONPATH=ROOT))
    assert run.returncode != 0 and f"{meta}: line 5: missing 'text'" in run.stderr, run.stderr
    assert run.stderr.startswith("coco.cider: error:"), run.stderr
    with open(meta, "w") as f:
        f.write(json.dumps(rows[0]) + "\n" + json.dumps(rows[1]) + "\n{oops\n")
    assert f"{meta}: line 3: invalid JSON" in _main_error([caps, meta])
    with open(meta, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    with open(caps, "w") as f:
        f.write(json.dumps({"source": 0, "text": "x"}) + "\n" + json.dumps({"source": "zzz.png", "text": "y"}))
    assert f"{caps}: line 2: source 'zzz.png' has no reference" in _main_error([caps, meta])


def _main_error(argv):
    with pytest.raises(cider.InputError) as excinfo:
        cider.main(argv)
    return str(excinfo.value)
