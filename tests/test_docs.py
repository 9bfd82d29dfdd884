"""Tests of README.md and docs/: every relative link and #anchor resolves, and every command in a fenced block names
a script that exists and only options that script's config block declares."""
import ast
import glob
import os
import re
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")
# options every script takes beside its config block (runtime.parse_config)
PARSER_OPTIONS = {"help"}


def read(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def slug(heading):
    """GitHub's anchor for a heading: lowercase, punctuation dropped except - and _, spaces as -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page):
    names, seen = set(), {}
    for line in FENCE.sub("", read(page)).splitlines():
        m = re.match(r"#{1,6} (.*)", line)
        if m:
            s = slug(m.group(1))
            names.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return names


def test_slug_follows_github():
    assert slug("Editing in the browser (`editor/`)") == "editing-in-the-browser-editor"
    assert slug("The server's limits") == "the-servers-limits"
    assert slug("2026-11-22: speed of AR mode") == "2026-11-22-speed-of-ar-mode"


@pytest.mark.parametrize("page", PAGES)
def test_links_resolve(page):
    bad = []
    for target in LINK.findall(FENCE.sub("", read(page))):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, fragment = target.partition("#")
        full = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else os.path.join(ROOT, page)
        if not os.path.exists(full):
            bad.append(f"{target}: no such file")
        elif fragment and full.endswith(".md") and fragment not in anchors(os.path.relpath(full, ROOT)):
            bad.append(f"{target}: no such heading")
    assert not bad, f"{page}: " + "; ".join(bad)


def script_options(path):
    """The keys of a script's `config = dict(...)` block, read from its source."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    call = next((node.value for node in tree.body if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "config" for t in node.targets)), None)
    if call is None:  # a script without a config block (test_all.py) takes words, no options
        return set()
    assert all(kw.arg for kw in call.keywords), f"{path}: the config block spreads another dict"
    return {kw.arg for kw in call.keywords} | PARSER_OPTIONS


def commands(page):
    """(line, script path, [--options], [words after the script]) of every python/torchrun call in the page's
    fenced blocks."""
    for block in FENCE.findall(read(page)):
        text = re.sub(r"\\\n", " ", block)
        for line in text.splitlines():
            line = line.split(" #")[0].strip().lstrip("$ ")
            for part in re.split(r"&&|;|\||\bdo\b|\bthen\b", line):
                try:
                    words = shlex.split(part)
                except ValueError:
                    continue
                words = [w for w in words if not re.match(r"[A-Z_]+=", w)]  # environment assignments
                script = None
                for i, w in enumerate(words):
                    if w in ("python", "torchrun") and i + 1 < len(words):
                        rest = words[i + 1:]
                        j = next((k for k, x in enumerate(rest) if x.endswith(".py") or x == "-m"), None)
                        if j is None or (w == "python" and rest[0] in ("-", "-c")):
                            break
                        script = rest[j + 1].replace(".", "/") + ".py" if rest[j] == "-m" else rest[j]
                        if rest[j] == "-m" and not os.path.exists(os.path.join(ROOT, script.split("/")[0])):
                            break  # another package's module (pytest, pip)
                        options = [x[2:].split("=")[0] for x in rest[j + 1:] if x.startswith("--")]
                        yield line, script, options, rest[j + 1:]
                        break


def test_commands_found():
    found = {script for page in PAGES for _, script, _, _ in commands(page)}
    assert {"train.py", "sample.py", "fid.py", "extract_latents.py", "editor/app.py"} <= found, found


@pytest.mark.parametrize("page", PAGES)
def test_commands_take_their_options(page):
    bad = []
    for line, script, options, words in commands(page):
        path = os.path.join(ROOT, script)
        if not os.path.exists(path):
            bad.append(f"{line!r}: no script {script}")
            continue
        known = script_options(path)
        bad += [f"{line!r}: {script} has no --{o}" for o in options if o.replace("-", "_") not in known]
        if script == "train.py" and "data" in options and not any(w.endswith(".py") for w in words):
            bad.append(f"{line!r}: train.py --data needs a recipe (its defaults are the CPU demo's)")
    assert not bad, f"{page}:\n" + "\n".join(bad)


def test_a_wrong_command_is_found(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("```bash\npython sample.py --ckpt X --nonsense 3\npython train.py --data D --out O\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    (tmp_path / "sample.py").write_text("config = dict(ckpt='')\n")
    (tmp_path / "train.py").write_text("config = dict(data='', out='')\n")
    with pytest.raises(AssertionError, match="(?s)no --nonsense.*--data needs a recipe"):
        test_commands_take_their_options("page.md")
