"""The README and the docs/ pages: every relative link and anchor leads somewhere.

Anchors follow GitHub's rules (github-slugger): the heading's rendered text, lower-cased, with
punctuation removed and each space turned into a hyphen; a repeated heading gets -1, -2, ...
Nothing here touches the network: links to other sites are not checked.
"""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def pages():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose_lines(text):
    """The lines outside fenced code blocks, where links and headings count."""
    inside = False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
        elif not inside:
            yield line


def slug(heading):
    """GitHub's anchor for a heading's Markdown text."""
    text = CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link counts by its text
    text = re.sub(r"\*+", "", text)  # emphasis markers are not text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path):
    found, seen = set(), {}
    for line in prose_lines(path.read_text(encoding="utf-8")):
        found.update(HTML_ANCHOR.findall(line))
        heading = HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(f"{base}-{count}" if count else base)
    return found


def broken_links(path, root=ROOT):
    """Each relative link of the page that leads nowhere, as 'page: target (why)'."""
    broken = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        for target in LINK.findall(CODE_SPAN.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, mailto: ...
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(root)}: {target}"
            if not linked.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
                broken.append(f"{where} (no heading with that anchor)")
    return broken


def test_every_relative_link_and_anchor_resolves():
    assert [broken for page in pages() for broken in broken_links(page)] == []


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {Path(target.partition("#")[0]).name for target in LINK.findall(readme)}
    assert [page.name for page in pages()[1:] if page.name not in linked] == []


def test_readme_stays_a_five_minute_read():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200


def test_anchors_follow_github_rules():
    assert slug("Train parameters (`params.yaml`)") == "train-parameters-paramsyaml"
    assert slug("Offline, GPU and macOS") == "offline-gpu-and-macos"
    assert slug("What `embed` writes") == "what-embed-writes"
    assert slug("`train_loss` and **bold** [link](x.md)") == "train_loss-and-bold-link"
    assert slug("Score: 600·top-1 + 300·top-5") == "score-600top-1--300top-5"


def test_a_broken_link_or_anchor_is_reported(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n## Part\n\n## Part\n\n"
        "[ok](#part-1) [ok](#title) [site](https://example.org/x#y) `[code](nowhere.md)`\n"
        "[gone](missing.md) [bad anchor](#nothing) [dup](#part-2)\n"
        "```\n[in a code block](missing.md)\n```\n",
        encoding="utf-8",
    )
    assert broken_links(page, root=tmp_path) == [
        "page.md: missing.md (no such file)",
        "page.md: #nothing (no heading with that anchor)",
        "page.md: #part-2 (no heading with that anchor)",
    ]
