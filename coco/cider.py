"""CIDEr-D as the MS-COCO caption evaluation computes it (pycocoevalcap cider/cider_scorer.py; Vedantam et al. 2015).

    python -m coco.cider captions.jsonl DIR/metadata.jsonl        # corpus CIDEr-D of sample.py's captions
    python -m coco.cider captions.jsonl DIR/metadata.jsonl --per-image scores.jsonl

captions.jsonl: one {"source": <file name, or integer index>, "text": <caption>} a line (sample.py --caption writes
it). metadata.jsonl: one {"file_name": "<path under DIR>", "text": "<caption>" or ["<caption>", ...]} a line. A
string source is matched to file_name (the same relative path, else the same base name when only one has it); an
integer source i is the i-th non-empty line of metadata.jsonl (0-based: the images of an .npz in metadata order).

The score, with pycocoevalcap's quirks kept so the numbers match it:
- n-grams n = 1..4, each sentence a tf-idf vector: tf * (log(number of images) - log(max(1, df))), df = how many
  images' reference sets contain the n-gram (the references only; the candidates never count);
- per n, the similarity with each reference is sum over the candidate's n-grams of min(w_cand, w_ref) * w_ref
  divided by |cand| |ref| (left as is when a norm is 0), times exp(-(len_c - len_r)^2 / (2 * 6^2)), where the
  "length" is the number of *bigrams* (the real code counts `n == 1` on a 0-based n-gram index: 2-grams, i.e.
  words - 1), not the number of words;
- the image's score is the mean over n of the sum over references, / number of references, * 10; the corpus
  score is the mean over images. One image alone scores 0: every idf is log(1) - log(1).
Tokenization is an approximation: the COCO tool runs the Stanford PTB tokenizer (Java, lowercased) and drops the
tokens '' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , : - -- ... ; and here: lowercase, drop quotes, brackets, ? ! ;, and
. , : except between digits (3.5, 1,000), split off clitics as PTB does ("dog's" -> dog 's, "can't" -> ca n't),
split on whitespace and drop the tokens that are only hyphens. Rare cases differ (PTB keeps "a.m." whole).
"""
import json
import math
import os
import re
import sys
from collections import Counter

from runtime import ConfigError, parse_config

config = dict(
    per_image="",  # also write one {"source", "file_name", "cider_d"} JSON line per image to this file
)

N, SIGMA = 4, 6.0  # pycocoevalcap's defaults: 1..4-grams, the gaussian length penalty's standard deviation
_DROP = [re.compile(r"[\"`()\[\]{}?!;]"),  # always punctuation in PTB's output
         re.compile(r"(?<!\d)[.,:]|[.,:](?!\d)"),  # sentence punctuation, but not inside 3.5 or 1,000
         re.compile(r"(?<!\w)'|'(?!\w)")]  # quote marks, not the apostrophe of dog's or o'clock
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'m|'ll|'d)\b")  # PTB splits these off as their own tokens


class InputError(ValueError):
    """A bad input file or argument; the message names the file, the line and the problem."""


def coco_tokenize(text):
    """str -> list of lowercase words: an approximation of the COCO tool's PTB tokenizer + punctuation removal."""
    text = text.lower()
    for pattern in _DROP:
        text = pattern.sub(" ", text)
    return [w for w in _CLITIC.sub(r" \1", text).split() if w.strip("-")]


def ngrams(words, n=N):
    """list of words -> Counter {tuple of k words: count} for k = 1..n."""
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _tfidf(counts, df, log_images, n):
    """-> (per order k-1: {ngram: weight}, per order: L2 norm, number of bigrams (pycocoevalcap's "length"))."""
    vec, norm = [{} for _ in range(n)], [0.0] * n
    for gram, tf in counts.items():
        w = tf * (log_images - math.log(max(1.0, df.get(gram, 0))))  # unseen n-gram: df 1
        vec[len(gram) - 1][gram] = w
        norm[len(gram) - 1] += w * w
    return vec, [math.sqrt(x) for x in norm], sum(tf for gram, tf in counts.items() if len(gram) == 2)


def cider_d(candidates, references, tokenize=True, n=N, sigma=SIGMA):
    """candidates {id: str}, references {id: [str, ...]} with the same ids -> (corpus CIDEr-D float, [per-image
    score float, in the order of candidates]). tokenize=False: the strings are already space-separated tokens."""
    for key in candidates:
        if key not in references:
            raise ValueError(f"candidate {key!r} has no references")
        if not references[key]:
            raise ValueError(f"candidate {key!r}: its list of references is empty")
    for key in references:
        if key not in candidates:
            raise ValueError(f"references of {key!r} have no candidate")
    if not candidates:
        raise ValueError("no candidates to score")
    split = coco_tokenize if tokenize else str.split
    cand = {key: ngrams(split(text), n) for key, text in candidates.items()}
    refs = {key: [ngrams(split(r), n) for r in references[key]] for key in candidates}
    df = Counter(gram for key in candidates for gram in set().union(*refs[key]))  # images whose refs have it
    log_images = math.log(len(candidates))
    penalty_scale = 2 * sigma ** 2
    scores = []
    for key in candidates:
        vc, nc, lc = _tfidf(cand[key], df, log_images, n)
        total = [0.0] * n  # per order: sum over references
        for ref in refs[key]:
            vr, nr, lr = _tfidf(ref, df, log_images, n)
            for k in range(n):
                dot = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vc[k].items())
                if nc[k] != 0 and nr[k] != 0:
                    dot /= nc[k] * nr[k]
                total[k] += dot * math.exp(-(lc - lr) ** 2 / penalty_scale)
        scores.append(sum(total) / n / len(refs[key]) * 10.0)
    return sum(scores) / len(scores), scores


# ------------------------------------------------------------------------------------------- files
def _jsonl(path):
    """Yield (line number, dict) per non-empty line, in order; bad JSON is an InputError naming the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8-sig") as f:  # tolerate a BOM, as json tools do
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}: line {lineno}: invalid JSON at column {e.colno}: {e.msg}") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}: line {lineno}: not a JSON object (a {type(obj).__name__})")
            yield lineno, obj


def read_references(path):
    """metadata.jsonl -> [(line number, normalized file_name, [captions])] in line order."""
    out, seen = [], {}
    for lineno, obj in _jsonl(path):
        missing = [k for k in ("file_name", "text") if k not in obj]
        if missing:
            raise InputError(f"{path}: line {lineno}: missing {' and '.join(map(repr, missing))}")
        name, text = obj["file_name"], obj["text"]
        texts = [text] if isinstance(text, str) else text
        if not isinstance(name, str) or not isinstance(texts, list) or not texts \
                or not all(isinstance(t, str) for t in texts):
            raise InputError(f"{path}: line {lineno}: expected \"file_name\": a string and \"text\": a string or a "
                             f"non-empty list of strings, got {name!r} and {text!r}")
        rel = os.path.normpath(name)
        if rel in seen:
            raise InputError(f"{path}: line {lineno}: file_name {name!r} already listed on line {seen[rel]}")
        seen[rel] = lineno
        out.append((lineno, rel, texts))
    if not out:
        raise InputError(f"{path}: lists no images")
    return out


def match_captions(captions_path, metadata_path):
    """-> (candidates {file_name: caption}, references {file_name: [captions]}, {file_name: source}), in the
    order of captions.jsonl; every caption line must find exactly one reference line."""
    refs = read_references(metadata_path)
    by_rel = {rel: texts for _, rel, texts in refs}
    by_base = {}
    for _, rel, _ in refs:
        by_base.setdefault(os.path.basename(rel), []).append(rel)
    candidates, references, sources, line_of = {}, {}, {}, {}
    for lineno, obj in _jsonl(captions_path):
        where = f"{captions_path}: line {lineno}"
        if "source" not in obj or not isinstance(obj.get("text"), str):
            raise InputError(f"{where}: expected {{\"source\": <file name or index>, \"text\": <caption>}}")
        source = obj["source"]
        if isinstance(source, int) and not isinstance(source, bool):
            if not 0 <= source < len(refs):
                raise InputError(f"{where}: source {source} is not an index of the {len(refs)} images of "
                                 f"{metadata_path}")
            rel = refs[source][1]
        elif isinstance(source, str):
            rel = os.path.normpath(source)
            if rel not in by_rel:
                found = by_base.get(os.path.basename(rel), [])
                if len(found) != 1:
                    why = f"matches several: {', '.join(found[:5])}" if found else "no such file_name"
                    raise InputError(f"{where}: source {source!r} has no reference in {metadata_path} ({why})")
                rel = found[0]
        else:
            raise InputError(f"{where}: source must be a file name or an integer index, got {source!r}")
        if rel in line_of:
            raise InputError(f"{where}: {rel!r} was already captioned on line {line_of[rel]}")
        line_of[rel], sources[rel] = lineno, source
        candidates[rel], references[rel] = obj["text"], by_rel[rel]
    if not candidates:
        raise InputError(f"{captions_path}: no captions")
    return candidates, references, sources


def main(argv=None):
    c = dict(config)
    paths = parse_config(c, argv, prog="coco.cider", positional="CAPTIONS.jsonl REFERENCES/metadata.jsonl")
    if len(paths) != 2:
        raise InputError("usage: python -m coco.cider captions.jsonl DIR/metadata.jsonl [--per-image scores.jsonl]")
    candidates, references, sources = match_captions(*paths)
    score, scores = cider_d(candidates, references)
    print(f"CIDEr-D: {score:.6f} ({len(scores)} images)")
    if c["per_image"]:
        with open(c["per_image"], "w", encoding="utf-8") as f:
            for rel, s in zip(candidates, scores):
                f.write(json.dumps({"source": sources[rel], "file_name": rel, "cider_d": s}) + "\n")
        print(f"wrote {c['per_image']}: {len(scores)} per-image scores")


if __name__ == "__main__":
    try:
        main()
    except (InputError, ConfigError, FileNotFoundError, ValueError) as e:
        sys.exit(f"coco.cider: error: {e}")
